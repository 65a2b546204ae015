"""Seeding every generator a run draws from (Python, numpy, torch).

Apart from the training engine so that the ServerApp can seed the initial
model's initialisation without importing the engine's data pipeline and
Opacus (0.6 s of its start-up, before the first round can be sent).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
