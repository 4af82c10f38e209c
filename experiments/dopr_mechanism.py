"""Why DoPr hurts behavior cloning on the pendulum: one layer along its Σ's weak directions.

For the runs of a finished behavior-cloning (``bc-*``), ``lorenz`` or ``flow-*`` study, one
learning rate, every seed: rebuild each optimizer's final model from its checkpoint, deploy it
on the test split recording the inputs it meets (the states of its episodes, with the task's
action noise; the states of its autoregressive rollouts while they stay valid; the points and
times of its Euler sampling trajectories), and compare, along
each eigenvector u_i of one layer's training Σ = E[z zᵀ] (z the layer's input with the bias
coordinate 1 — for the input layer the standardized observation;
`beyondloss.optim.diagnostics.directional_profile`):

* σ_i, the training second moment, and AP's gain (σ_max + λ)/(σ_i + λ) at DoPr's damping;
* the excitation u_iᵀ Σ_deployed u_i / σ_i of the inputs met when deployed;
* the layer's response ‖[W b] u_i‖;
* the model's sensitivity along u_i: the mean over training inputs (about
  :data:`SENSITIVITY_SAMPLES`, evenly strided) of ‖∂y/∂z · u_i‖, how far
  the network's output y moves per unit of the layer's input along u_i (every later layer).

    python experiments/dopr_mechanism.py --out runs-ablation --lr 3e-3
    python experiments/dopr_mechanism.py --out runs-ablation --lr 3e-3 --layer 4   # the head

The study must have been run with the same ``--size``, ``--lrs`` (containing ``--lr``) and
DoPr settings (``--scope``, ``--damping``) into ``--out``. Prints two markdown tables of
medians over seeds: a summary over the subspace A of the directions AP amplifies more than
:data:`AMPLIFIED`-fold, then the weakest directions one by one beside the strongest. The
summary gives the share of the inputs' second moment in A (Σ_i over A of σ_i over all σ_i), in
training and in deployment, and the mean sensitivity inside and outside A. A is defined at
``--subspace-damping``, by default the runs' damping; fix it to compare runs of different
dampings on the same directions.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from beyondloss.metrics.rollout import normalized_rmse
from beyondloss.optim.config import APConfig
from beyondloss.optim.diagnostics import directional_profile
from beyondloss.study import StudySpec
from beyondloss.study.ttf import rebuild, run_job
from beyondloss.tasks.control import BehaviorCloningTask, environments, episode_seeds, rollout
from beyondloss.tasks.dynamics import Lorenz63Task
from beyondloss.tasks.flow import FlowMatchingTask, integrate

AMPLIFIED = 100.0
"""AP gain above which a direction counts as amplified (the summary's subspace A)."""

SENSITIVITY_SAMPLES = 4096
"""Training inputs (every k-th) over which the sensitivity is averaged."""

FLOW_TRAINING_POINTS = 16384
"""Training data points (every k-th) behind a flow's training Σ, one path point each."""


def layer_inputs(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], index: int
) -> torch.Tensor:
    """The inputs of ``model.net[index]`` when ``model`` is called on ``inputs`` (its arguments:
    observations, or points and times of a flow), with the bias coordinate 1 appended: the z of
    that layer's Σ, ``(n, d + 1)``."""
    captured: list[torch.Tensor] = []
    hook = model.net[index].register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    with torch.no_grad():
        model(*(tensor.float() for tensor in inputs))
    hook.remove()
    z = captured[0]
    return torch.cat([z, torch.ones(len(z), 1)], dim=1).double()


@torch.no_grad()  # forward-mode only: no autograd graph kept per direction (it ran out of memory)
def sensitivity(net: torch.nn.Module, z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of ``z`` of ‖J(z) u‖ for each column u of ``directions`` (their
    input part; the bias coordinate is not an input to perturb), J = ∂net/∂z."""
    z = z.float()
    out = []
    for u in directions.T:
        tangent = u.float().expand_as(z)
        _, change = torch.func.jvp(net, (z,), (tangent,))
        out.append(change.norm(dim=1).mean())
    return torch.stack(out).detach()


def training_inputs(task) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    """The model's arguments in training: the training observations or states; for a flow, the
    path points x_t = (1 − t) x0 + t x1 of the training data x1 with one fixed draw of noise x0
    and time t (the loss draws fresh ones every batch), and t."""
    data = task.splits().train.tensors[0]
    if isinstance(task, FlowMatchingTask):
        generator = torch.Generator().manual_seed(0)
        x1 = data[:: max(1, len(data) // FLOW_TRAINING_POINTS)].double()
        x0 = torch.randn(x1.shape, generator=generator, dtype=torch.float64)
        t = torch.rand(len(x1), generator=generator, dtype=torch.float64)
        return ((1 - t[:, None]) * x0 + t[:, None] * x1, t)
    return (data,)


def deployed_inputs(task, model: torch.nn.Module) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]  # noqa: E501
    """The model's arguments when ``model`` is deployed on the test split: the observations of
    its test episodes (control tasks); the states of its autoregressive test rollouts while
    each stays within the valid region (Lorenz: NRMSE ≤ the VPT threshold); the points and
    times of its Euler sampling trajectories from the test noise, at the task's primary step
    count (flow)."""
    config = task.config
    if isinstance(task, BehaviorCloningTask):
        seeds = episode_seeds(config.seed, "test", config.n_eval_episodes)
        envs = environments(config.env, config.n_eval_episodes)
        result = rollout(
            model, envs, seeds, config.episode_steps, config.eval_action_noise, record=True
        )
        return (torch.as_tensor(result.observations),)
    if isinstance(task, Lorenz63Task):
        reference = task._data().rollouts["test"]
        state, states = reference[:, 0], []
        unit = torch.ones(reference.shape[-1])  # standardized states: σ = 1, as the task uses
        with torch.no_grad():
            for step in range(1, reference.shape[1]):
                state = model(state)
                error = normalized_rmse(state[:, None], reference[:, step : step + 1], unit)
                valid = error[:, 0] <= config.vpt_threshold
                if not bool(valid.any()):
                    break
                states.append(state[valid])
        return (torch.cat(states),)
    if isinstance(task, FlowMatchingTask):
        steps = int(task.primary_metric.split("@euler")[1])  # e.g. "w2@euler8"
        points, times = [], []

        def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            points.append(x)
            times.append(t)
            return model(x, t)

        with torch.no_grad():
            integrate(recording, task.noise("test").float(), steps, "euler")
        return (torch.cat(points), torch.cat(times))
    raise ValueError(f"no deployed inputs for task {type(task).__name__}")


def profile_run(  # type: ignore[no-untyped-def]
    task, job, index: int, damping: float, damping_mode: str, subspace_damping: float
) -> dict[str, list[float]]:
    """Per-direction quantities of layer ``net[index]`` of one run (weakest direction first),
    and the run's test primary metric; the subspace A is where AP at ``subspace_damping``
    amplifies more than :data:`AMPLIFIED`-fold."""
    model = rebuild(job).eval()
    z_train = layer_inputs(model, training_inputs(task), index)
    sigma = z_train.T @ z_train / len(z_train)
    deployed = layer_inputs(model, deployed_inputs(task, model), index)
    profile = directional_profile(sigma, deployed, damping, damping_mode)
    layer = model.net[index]
    weight = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()
    rest = model.net[index:]
    stride = max(1, len(z_train) // SENSITIVITY_SAMPLES)
    metric = task.evaluate(model, "test", primary_only=True)[task.primary_metric]
    subspace = directional_profile(sigma, deployed, subspace_damping, damping_mode)
    amplified = subspace.gain > AMPLIFIED
    sensitivities = sensitivity(rest, z_train[::stride, :-1], profile.vectors[:-1])
    return {
        "share_train": [float(profile.train[amplified].sum() / profile.train.sum())],
        "share_deployed": [float(profile.deployed[amplified].sum() / profile.deployed.sum())],
        "amplified": [float(amplified.sum())],
        "sensitivity_amplified": [float(sensitivities[amplified].mean())],
        "sensitivity_rest": [float(sensitivities[~amplified].mean())],
        "sensitivity": sensitivities.tolist(),
        "sigma": profile.train.tolist(),
        "gain": profile.gain.tolist(),
        "excitation": profile.excitation.tolist(),
        "response": profile.response(weight).tolist(),
        "metric": [float(metric)],
    }


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is 0 (no amplified direction)."""
    return a / b if b > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="bc-pendulum")
    parser.add_argument("--size", default="full")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--optimizers", default="adamw,dopr-adamw,muon,dopr-muon")
    parser.add_argument("--scope", default=None)
    parser.add_argument("--damping", type=float, default=None)
    parser.add_argument("--weakest", type=int, default=3, help="weak directions to show")
    parser.add_argument("--layer", type=int, default=0, help="index in model.net (0: input)")
    parser.add_argument(
        "--subspace-damping",
        type=float,
        default=None,
        help="γ whose AP gain defines the amplified subspace A (default: the runs' damping);"
        " fix it to compare runs of different dampings on the same directions",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    dopr = {k: v for k, v in (("scope", args.scope), ("damping", args.damping)) if v is not None}
    spec = StudySpec(
        args.task,
        size=args.size,
        optimizers=tuple(args.optimizers.split(",")),
        lrs=(args.lr,),
        seeds=args.seeds,
        dopr=dopr,
        out=args.out,
    )
    task = spec.make_task()
    config = APConfig.from_mapping({k: v for k, v in dopr.items() if k == "damping"})
    subspace_damping = args.subspace_damping or config.damping
    rows, summary = [], []
    for optimizer in spec.optimizers:
        runs = [
            profile_run(
                task,
                run_job(spec, optimizer, args.lr, seed),
                args.layer,
                config.damping,
                config.damping_mode,
                subspace_damping,
            )
            for seed in range(args.seeds)
        ]
        median = {
            key: [statistics.median(run[key][i] for run in runs) for i in range(len(runs[0][key]))]
            for key in runs[0]
        }
        summary.append(
            f"| {optimizer} | {median['amplified'][0]:.0f} of {len(median['sigma'])} "
            f"| {median['share_train'][0]:.2e} | {median['share_deployed'][0]:.2e} "
            f"| {ratio(median['share_deployed'][0], median['share_train'][0]):.3g} "
            f"| {median['sensitivity_amplified'][0]:.3g} | {median['sensitivity_rest'][0]:.3g} "
            f"| {median['metric'][0]:.3g} |"
        )
        directions = [*range(args.weakest), len(median["sigma"]) - 1]
        for i in directions:
            rows.append(
                f"| {optimizer} | {'u_' + str(i + 1) if i < args.weakest else 'u_max'} "
                f"| {median['sigma'][i]:.2e} | {median['gain'][i]:.3g} "
                f"| {median['excitation'][i]:.3g} | {median['response'][i]:.3g} "
                f"| {median['sensitivity'][i]:.3g} "
                f"| {median['metric'][0]:.3g} |"
            )
    print(
        f"{args.task} {args.size}, layer net.{args.layer}, lr {args.lr:g}, "
        f"DoPr settings {dopr or 'defaults'}, A at damping {subspace_damping:g}, "
        f"median over {args.seeds} seeds\n"
    )
    print(
        f"| optimizer | directions A (AP gain > {AMPLIFIED:g}) | train energy in A "
        "| deployed energy in A | deployed / train | mean ‖J u‖, A | mean ‖J u‖, rest "
        f"| test {task.primary_metric} |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    print("\n".join(summary) + "\n")
    print(
        "| optimizer | direction | σ_i (train) | AP gain | deployed / train | ‖[W b] u_i‖ "
        f"| ‖J u_i‖ | test {task.primary_metric} |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
