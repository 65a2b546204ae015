"""A site's copies of the global model: which entries travel, and under FedBN its own normalisation layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ExperimentConfig
from common.models import ModelKind, build_model
from common.records import ModelCodec


class SiteModels:
    """Builds the received model for one run at one site; keeps what never leaves it (FedBN's layers)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self._codecs: dict[str, ModelCodec] = {}

    def _model_cfg(self, kind: ModelKind) -> Any:
        return getattr(self.cfg.models, kind)

    def codec(self, kind: ModelKind, state: dict[str, torch.Tensor] | None = None) -> ModelCodec:
        """Which entries travel (all float tensors; under FedBN, not the normalisation layers).

        ``state``: a fresh model's state dict, when the caller has one (saves building another).
        """
        if kind not in self._codecs:
            if state is None:
                state = build_model(kind, self._model_cfg(kind), mask_channel=self.cfg.preprocess.mask_channel).state_dict()
            self._codecs[kind] = ModelCodec.for_state_dict(state, exclude_norm=self.cfg.federation.strategy == "fedbn")
        return self._codecs[kind]

    def _local_state_path(self, kind: ModelKind, fold: int, rnd: int) -> Path:
        return self.run_dir / "state" / f"{kind}_fold{fold}_round{rnd}.pt"

    def load(self, kind: ModelKind, fold: int, flat: np.ndarray, rnd: int | None = None) -> torch.nn.Module:
        """Global weights plus, under FedBN, this site's own normalisation layers of round ``rnd``."""
        model = build_model(kind, self._model_cfg(kind), mask_channel=self.cfg.preprocess.mask_channel)
        state = model.state_dict()
        state.update(self.codec(kind, state).unpack(flat))
        if rnd is not None and self.cfg.federation.strategy == "fedbn":
            path = self._local_state_path(kind, fold, rnd)
            if path.is_file():
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict(state)
        return model

    def save_local(self, model: torch.nn.Module, kind: ModelKind, fold: int, rnd: int) -> None:
        """Under FedBN, the layers that stay here, for the site's next round of this fold."""
        if self.cfg.federation.strategy != "fedbn":
            return
        keep = set(self.codec(kind).keys)
        local = {k: v for k, v in model.state_dict().items() if k not in keep}
        path = self._local_state_path(kind, fold, rnd)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(local, path)
