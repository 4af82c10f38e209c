"""Test-wide settings: one intra-op thread, so tiny models are not slowed by thread contention."""

import torch

torch.set_num_threads(1)
