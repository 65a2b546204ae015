"""The one model factory: every network of the project is built here.

The client, the server (for the initial global model) and the baselines all
call :func:`build_model`, so parameter names and shapes agree everywhere and
arrays average across sites.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.nets import DenseNet, DenseNet121
from torch import nn

from .config import ModelConfig

log = logging.getLogger(__name__)

ModelKind = Literal["densenet3d", "densenet2d"]
IMAGENET_FILE = "densenet121-a639ec97.pth"
SMALL: dict[str, Any] = {"init_features": 16, "growth_rate": 8, "block_config": (2, 2, 2, 2)}
# torchvision names a dense layer's parts "norm1"/"conv1"; MONAI nests them as "layers.norm1".
_TV_LAYER_KEY = re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)[12]\.(?:weight|bias|running_mean|running_var))$")


class PretrainedWeightsError(FileNotFoundError):
    """ImageNet weights were required but are not on disk."""


def in_channels(kind: ModelKind, mask_channel: bool = False) -> int:
    """3D input is one HU-windowed channel; 2D input is three HU windows (RGB-like); plus the ROI mask.

    The one place channel counts are decided (``preprocess.mask_channel``).
    """
    return (1 if kind == "densenet3d" else 3) + int(mask_channel)


def _norm(cfg: ModelConfig) -> Any:
    if cfg.norm == "group":
        return ("group", {"num_groups": cfg.group_norm_groups})
    if cfg.norm == "instance":
        return ("instance", {"affine": True})
    return "batch"


def build_model(kind: ModelKind, cfg: ModelConfig, *, mask_channel: bool = False) -> nn.Module:
    """Build the 3D or 2D DenseNet of the study (2 outputs: benign, malignant).

    ``mask_channel`` (``preprocess.mask_channel``) adds the ROI mask input channel.

    Activations are not in place when the norm is not BatchNorm, because
    Opacus' per-sample gradient hooks fail on in-place ReLU (stack notes).
    """
    spatial_dims = 3 if kind == "densenet3d" else 2
    act = ("relu", {"inplace": cfg.norm == "batch"})
    common: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels(kind, mask_channel),
        "out_channels": 2,
        "norm": _norm(cfg),
        "act": act,
        "dropout_prob": cfg.dropout,
    }
    model: nn.Module
    if cfg.arch == "densenet121":
        model = DenseNet121(pretrained=False, **common)
    else:
        model = DenseNet(**common, **SMALL)
    if cfg.pretrained and kind == "densenet2d":
        load_imagenet_weights(model, cfg)
    return model


def imagenet_weights_path(cfg: ModelConfig) -> Path:
    """Where ImageNet DenseNet121 weights are looked for (no network access ever).

    ``pretrained_path`` when set; otherwise torch hub's cache
    (``$TORCH_HOME/hub/checkpoints/densenet121-a639ec97.pth``), where a
    hospital can place the file from torchvision's model zoo.
    """
    if cfg.pretrained_path:
        return Path(cfg.pretrained_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def load_imagenet_weights(model: nn.Module, cfg: ModelConfig) -> int:
    """Load torchvision ImageNet DenseNet121 weights into a MONAI 2D DenseNet121.

    Tensors whose shape differs (the 2-class head) are skipped.  Returns the
    number of tensors loaded.  When the file is absent, raise unless the config
    allows random initialisation, in which case say so loudly and go on.
    """
    path = imagenet_weights_path(cfg)
    if not path.is_file():
        msg = (
            f"ImageNet weights for the 2D DenseNet121 not found at {path}; place torchvision's "
            f"{IMAGENET_FILE} there or set models.densenet2d.pretrained_path"
        )
        if not cfg.allow_random_init:
            raise PretrainedWeightsError(msg)
        log.warning("%s. Continuing from RANDOM initialisation (models.densenet2d.allow_random_init=true).", msg)
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        m = _TV_LAYER_KEY.match(key)
        renamed[f"{m.group(1)}.layers.{m.group(2)}" if m else key] = value
    own = model.state_dict()
    usable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    for k, v in renamed.items():
        # the first convolution with the mask channel: ImageNet's RGB filters, zero for the mask
        # (the network starts as the pretrained one and learns what the mask adds)
        if k in own and v.ndim == 4 and own[k].shape[1] > v.shape[1] and own[k].shape[0] == v.shape[0] and own[k].shape[2:] == v.shape[2:]:
            widened = torch.zeros_like(own[k])
            widened[:, : v.shape[1]] = v
            usable[k] = widened
    if not usable:
        raise PretrainedWeightsError(f"{path}: no tensor matches the 2D DenseNet121 (is it densenet121 weights?)")
    own.update(usable)
    model.load_state_dict(own)
    log.info("Loaded %d/%d ImageNet tensors from %s", len(usable), len(own), path)
    return len(usable)


def is_norm_key(name: str) -> bool:
    """True for normalisation-layer parameters and statistics (kept local under FedBN)."""
    parts = name.split(".")
    return any(p.startswith("norm") or p == "bn" for p in parts[:-1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
