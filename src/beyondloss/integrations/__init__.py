"""Recipes for training with DoPr inside third-party training loops (optional extras).

DoPr takes the model itself, not its parameters, because its activation preconditioner reads
every layer's inputs through forward hooks. Frameworks that build the optimizer for you from
``model.parameters()`` therefore need one small adapter each:

* :mod:`beyondloss.integrations.huggingface` — ``transformers.Trainer`` (``pip install
  'beyondloss[hf]'``): :class:`~beyondloss.integrations.huggingface.DoPrTrainer`, or
  ``Trainer(optimizers=(dopr_from_args(model, args), None))``.
* :mod:`beyondloss.integrations.lightning` — PyTorch Lightning (``pip install
  'beyondloss[lightning]'``): return ``DoPr(self, ...)`` from ``configure_optimizers``.

The submodules import their framework at import time; this package imports neither, so
``import beyondloss.integrations`` always works. See docs/integrations.md for what is and is
not supported.
"""
