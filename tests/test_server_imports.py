"""The ServerApp orchestrates with numpy: importing it loads no deep-learning stack.

``flwr-serverapp`` imports ``server.app`` before the plan's first message; torch,
MONAI and Opacus took 2.6 of its 4.5 s there (Intel Xeon, 2026-12-04).  The first
fold's initial model is where the server first needs MONAI, imported there; the
training engine and Opacus it never needs (0.6 s more before the first round).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "opacus")


def test_importing_the_serverapp_loads_no_torch_monai_or_opacus() -> None:
    code = f"import sys, server.app; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_initial_model_loads_neither_the_training_engine_nor_opacus() -> None:
    code = (
        "import sys, server.app; from common.configfile import load_config; "
        "from server.training import initial_vector; initial_vector(load_config('tiny'), 'densenet3d'); "
        "print(sorted(m for m in ('common.engine', 'opacus', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "['monai']", out.stdout + out.stderr


def test_the_initial_model_is_still_the_factorys_under_the_runs_seed() -> None:
    """The lazily imported factory builds the same round-0 vector as building it directly (bit for bit)."""
    import numpy as np

    from common.configfile import load_config
    from common.models import build_model
    from common.records import ModelCodec
    from common.seeding import seed_everything
    from server.training import initial_vector

    cfg = load_config("tiny")
    got = initial_vector(cfg, "densenet3d")
    seed_everything(cfg.train.seed)
    model = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel)
    want = ModelCodec.for_state_dict(model.state_dict()).pack(model.state_dict())
    assert got.dtype == want.dtype and np.array_equal(got, want)
