"""Test-suite settings: tiny models run fastest on one thread on a shared 2-core machine."""

import torch

torch.set_num_threads(1)
