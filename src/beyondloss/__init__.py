"""beyondloss: train and select neural networks by how they perform where they are deployed.

Subpackages
-----------
optim      DoPr (activation preconditioning before any gradient preconditioner).
tasks      Test-time-feedback tasks: data, model, one-step loss, downstream rollout metrics.
train      The one training loop (per-epoch evaluation, atomic checkpoints, exact resume).
store      Embedded SQLite results store.
"""

__version__ = "0.1.0"
