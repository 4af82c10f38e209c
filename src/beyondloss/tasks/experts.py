"""Experts for the MuJoCo behavior-cloning tasks: LQR, inverse kinematics + PD, and trained
linear locomotion policies.

Every expert is an ``nn.Module`` mapping a batch of Gymnasium observations ``(B, d_obs)`` to
actions ``(B, d_act)`` inside the action box ``[-1, 1]^{d_act}``, so it is rolled out exactly
like a learned policy. Experts hold float64 buffers and compute in float64.

:class:`LQRExpert` — ``InvertedDoublePendulum-v5``. The state is
:math:`s = (x, \\theta_1, \\theta_2, \\dot x, \\dot\\theta_1, \\dot\\theta_2)` (cart position in m,
hinge angles in rad measured from upright, velocities per s); the action is the motor command
:math:`u \\in [-1, 1]` (cart force :math:`500u` N). :func:`lqr_gain` linearizes one environment
step (``frame_skip`` physics steps with the command held) at the upright equilibrium and solves
the discrete algebraic Riccati equation, giving :math:`u = \\mathrm{clip}(-Ks, -1, 1)`.

:class:`ReacherExpert` — ``Reacher-v5``. Closed-form inverse kinematics of the planar two-link
arm gives the joint angles that put the fingertip on the target; a joint-space PD law drives
the arm there, :math:`u = \\mathrm{clip}(k_p (q^* - q) - k_d \\dot q, -1, 1)`.

:class:`LinearExpert` — ``Hopper-v5`` and ``HalfCheetah-v5``. No closed-form controller walks,
so these experts are linear policies :math:`u = \\mathrm{clip}(M (o - \\mu) / \\sigma, -1, 1)`
trained by Augmented Random Search (:mod:`beyondloss.tasks.ars`) with
``experiments/train_locomotion_experts.py``; their arrays are committed with the package and
checksum-verified on load (:mod:`beyondloss.tasks.expert_files`).
"""

from __future__ import annotations

import copy

import mujoco
import numpy as np
import scipy.linalg
import torch
from torch import nn

from beyondloss.tasks.expert_files import ExpertFile, load_expert

PENDULUM_LQR_Q = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""Diagonal of the LQR state cost on :math:`(x, \\theta_1, \\theta_2, \\dot x, \\dot\\theta_1,
\\dot\\theta_2)` (m, rad, m/s, rad/s)."""

PENDULUM_LQR_R = 1.0
"""LQR cost of the motor command (control-range units, :math:`u \\in [-1, 1]`)."""

REACHER_KP = 0.5
"""Reacher PD stiffness, command units per rad. With gear 200 N·m, joint armature 1 kg·m² and
damping 1 N·m·s (link inertia is ~1e-4 kg·m², negligible), a joint obeys
:math:`\\ddot q \\approx 200 k_p e - (200 k_d + 1)\\dot q`: natural frequency
:math:`\\sqrt{200 k_p} = 10` rad/s."""

REACHER_KD = 0.1
"""Reacher PD damping, command units per rad/s: damping ratio
:math:`(200 k_d + 1) / (2 \\cdot 10) \\approx 1.05`, critically damped; the fingertip settles in
about 0.5 s of the 1 s episode."""


def linearize_step(model: mujoco.MjModel, frame_skip: int) -> tuple[np.ndarray, np.ndarray]:
    """Discrete linearization of one environment step at the model's reference state.

    ``mujoco.mjd_transitionFD`` gives :math:`(A, B)` of one physics step, :math:`\\delta s' =
    A\\,\\delta s + B\\,\\delta u` with :math:`s = (q, \\dot q)` in tangent space, but it refuses
    the RK4 integrator, so it runs on a copy of ``model`` switched to (semi-implicit) Euler at
    the same timestep. Holding the command for ``frame_skip`` steps (zero-order hold) composes to

    .. math::

        A_k = A^k, \\qquad B_k = \\sum_{j=0}^{k-1} A^j B .

    Parameters
    ----------
    model:
        The environment's model; not modified. Linearized at ``qpos0``, zero velocity and zero
        control (centered differences, step 1e-6).
    frame_skip:
        Physics steps per environment step, ``>= 1``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        :math:`A_k` of shape ``(2 nv, 2 nv)`` and :math:`B_k` of shape ``(2 nv, nu)``.
    """
    if frame_skip < 1:
        raise ValueError(f"frame_skip must be at least 1, got {frame_skip}")
    euler = copy.copy(model)
    euler.opt.integrator = mujoco.mjtIntegrator.mjINT_EULER
    data = mujoco.MjData(euler)
    mujoco.mj_forward(euler, data)
    n_state = 2 * euler.nv + euler.na
    a = np.zeros((n_state, n_state))
    b = np.zeros((n_state, euler.nu))
    mujoco.mjd_transitionFD(euler, data, 1e-6, True, a, b, None, None)
    a_k = np.linalg.matrix_power(a, frame_skip)
    b_k = sum(np.linalg.matrix_power(a, j) for j in range(frame_skip)) @ b
    return a_k, b_k


def lqr_gain(a: np.ndarray, b: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Infinite-horizon discrete LQR gain :math:`K` minimizing :math:`\\sum_t s_t^\\top Q s_t +
    u_t^\\top R u_t` subject to :math:`s_{t+1} = A s_t + B u_t`, with :math:`u = -Ks`:

    .. math::

        P = A^\\top P A - A^\\top P B (R + B^\\top P B)^{-1} B^\\top P A + Q, \\qquad
        K = (R + B^\\top P B)^{-1} B^\\top P A .

    Shapes: ``a`` ``(n, n)``, ``b`` ``(n, m)``, ``q`` ``(n, n)``, ``r`` ``(m, m)``; returns
    ``(m, n)``.
    """
    p = scipy.linalg.solve_discrete_are(a, b, q, r)
    return np.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)


class LQRExpert(nn.Module):
    """LQR balance controller of ``InvertedDoublePendulum-v5`` (see module docs).

    Reads the state from the observation ``(cart x, sin θ1, sin θ2, cos θ1, cos θ2, ẋ, θ̇1,
    θ̇2, constraint force)``: angles by ``atan2(sin, cos)``, velocities as observed (the
    environment clips them to ±10, far outside the region the controller keeps).
    """

    def __init__(self, gain: np.ndarray) -> None:
        super().__init__()
        gain = np.asarray(gain, dtype=np.float64)
        if gain.shape != (1, 6):
            raise ValueError(f"gain must have shape (1, 6), got {gain.shape}")
        self.register_buffer("gain", torch.from_numpy(gain.copy()))

    @classmethod
    def from_model(cls, model: mujoco.MjModel, frame_skip: int) -> LQRExpert:
        """The expert for ``model`` stepped ``frame_skip`` physics steps per action, with the
        costs :data:`PENDULUM_LQR_Q` and :data:`PENDULUM_LQR_R`."""
        a, b = linearize_step(model, frame_skip)
        q = np.diag(PENDULUM_LQR_Q)
        r = np.array([[PENDULUM_LQR_R]])
        return cls(lqr_gain(a, b, q, r))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Commands ``(B, 1)`` in ``[-1, 1]`` for observations ``(B, 9)``."""
        obs = observation.to(torch.float64)
        state = torch.stack(
            (
                obs[:, 0],
                torch.atan2(obs[:, 1], obs[:, 3]),
                torch.atan2(obs[:, 2], obs[:, 4]),
                obs[:, 5],
                obs[:, 6],
                obs[:, 7],
            ),
            dim=1,
        )
        return (-state @ self.gain.T).clamp(-1.0, 1.0)


def two_link_ik(
    target: torch.Tensor, upper: float, lower: float, elbow_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint angles placing a planar two-link arm's tip at ``target``, elbow angle ``>= 0``.

    With link lengths :math:`l_1` (``upper``) and :math:`l_2` (``lower``), target
    :math:`(g_x, g_y)` at distance :math:`\\rho` from the base:

    .. math::

        \\cos q_2 = \\frac{\\rho^2 - l_1^2 - l_2^2}{2 l_1 l_2}, \\qquad
        q_1 = \\operatorname{atan2}(g_y, g_x) - \\operatorname{atan2}(l_2 \\sin q_2,
        l_1 + l_2 \\cos q_2).

    One elbow branch (:math:`q_2 \\in [0, \\pi]`) is always taken, so the solution is a
    continuous function of the target: an expert that picked the branch nearer the current
    configuration would switch discontinuously where the two are equally near. Unreachable
    targets are projected: :math:`\\cos q_2` is clipped to ``[-1, 1]`` and :math:`q_2` to
    ``elbow_max`` (the joint limit), and :math:`q_1` then points the arm at the target.

    Parameters
    ----------
    target:
        Tip positions relative to the base, shape ``(B, 2)`` (m).
    upper, lower:
        Link lengths :math:`l_1, l_2` (m), positive.
    elbow_max:
        Largest elbow angle (rad), in ``(0, π]``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        :math:`q_1 \\in (-2\\pi, \\pi]` and :math:`q_2 \\in [0, \\text{elbow\\_max}]`, shape
        ``(B,)`` each (rad).
    """
    gx, gy = target[:, 0], target[:, 1]
    cos_elbow = (gx.square() + gy.square() - upper**2 - lower**2) / (2.0 * upper * lower)
    elbow = torch.arccos(cos_elbow.clamp(-1.0, 1.0)).clamp(max=elbow_max)
    shoulder = torch.atan2(gy, gx) - torch.atan2(
        lower * torch.sin(elbow), upper + lower * torch.cos(elbow)
    )
    return shoulder, elbow


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """``angle`` (rad) wrapped to ``[-π, π)``."""
    return torch.remainder(angle + torch.pi, 2.0 * torch.pi) - torch.pi


class ReacherExpert(nn.Module):
    """Inverse kinematics + joint PD controller of ``Reacher-v5`` (see module docs).

    Reads the observation ``(cos q1, cos q2, sin q1, sin q2, target x, target y, q̇1, q̇2,
    fingertip − target x, y)``. The shoulder error is wrapped to ``[-π, π)`` (the shoulder is
    unlimited, so the shorter way round is taken); the elbow error is not (the elbow is limited
    to ±3 rad and cannot pass through ±π).

    Parameters
    ----------
    upper, lower:
        Link lengths (m): shoulder→elbow and elbow→fingertip. :meth:`from_model` reads them
        from the MuJoCo model (0.1 and 0.11 for ``reacher.xml``).
    elbow_max:
        The elbow's joint limit (rad).
    kp, kd:
        PD gains (command units per rad and per rad/s); defaults :data:`REACHER_KP`,
        :data:`REACHER_KD`.
    """

    def __init__(
        self,
        upper: float,
        lower: float,
        elbow_max: float,
        kp: float = REACHER_KP,
        kd: float = REACHER_KD,
    ) -> None:
        super().__init__()
        if min(upper, lower, kp) <= 0 or kd < 0 or not 0 < elbow_max <= np.pi:
            raise ValueError(
                "need upper, lower, kp > 0, kd >= 0 and elbow_max in (0, pi]; got "
                f"{upper}, {lower}, {kp}, {kd}, {elbow_max}"
            )
        self.upper, self.lower, self.elbow_max = float(upper), float(lower), float(elbow_max)
        self.register_buffer("gains", torch.tensor([kp, kd], dtype=torch.float64))

    @classmethod
    def from_model(cls, model: mujoco.MjModel) -> ReacherExpert:
        """The expert with link lengths and elbow limit read from a ``reacher.xml`` model."""
        upper = float(model.body("body1").pos[0])
        lower = float(model.body("fingertip").pos[0])
        elbow_max = float(model.jnt_range[model.joint("joint1").id, 1])
        return cls(upper, lower, elbow_max)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Commands ``(B, 2)`` in ``[-1, 1]`` for observations ``(B, 10)``."""
        obs = observation.to(torch.float64)
        shoulder = torch.atan2(obs[:, 2], obs[:, 0])
        elbow = torch.atan2(obs[:, 3], obs[:, 1])
        shoulder_goal, elbow_goal = two_link_ik(obs[:, 4:6], self.upper, self.lower, self.elbow_max)
        error = torch.stack((wrap_angle(shoulder_goal - shoulder), elbow_goal - elbow), dim=1)
        kp, kd = self.gains
        return (kp * error - kd * obs[:, 6:8]).clamp(-1.0, 1.0)


class LinearExpert(nn.Module):
    """Linear policy :math:`u = \\mathrm{clip}(M (o - \\mu) / \\sigma, -1, 1)` (see module docs).

    Parameters
    ----------
    weights:
        :math:`M`, shape ``(d_act, d_obs)`` (command units per standardized observation unit).
    obs_mean, obs_std:
        :math:`\\mu` and :math:`\\sigma > 0`, shape ``(d_obs,)``, in observation units.
    """

    def __init__(self, weights: np.ndarray, obs_mean: np.ndarray, obs_std: np.ndarray) -> None:
        super().__init__()
        checked = ExpertFile(weights, obs_mean, obs_std, metadata={})
        for name in ("weights", "obs_mean", "obs_std"):
            array = np.asarray(getattr(checked, name), dtype=np.float64)
            self.register_buffer(name, torch.from_numpy(array.copy()))

    @classmethod
    def from_file(cls, stored: ExpertFile) -> LinearExpert:
        """The policy of an expert file's contents."""
        return cls(stored.weights, stored.obs_mean, stored.obs_std)

    @classmethod
    def load(cls, name: str) -> LinearExpert:
        """The committed expert ``name`` (``"hopper"``, ``"halfcheetah"``), checksum verified."""
        return cls.from_file(load_expert(name))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Commands ``(B, d_act)`` in ``[-1, 1]`` for observations ``(B, d_obs)``."""
        standardized = (observation.to(torch.float64) - self.obs_mean) / self.obs_std
        return (standardized @ self.weights.T).clamp(-1.0, 1.0)
