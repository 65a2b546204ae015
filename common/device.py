"""Where the engine runs: device, mixed precision and augmentation placement.

:func:`resolve` is pure: it takes what the machine offers (:class:`Offer`)
as an argument, so "what would ``cuda:1`` do on a two-GPU machine" is a
unit test on a CPU machine.  :func:`for_config` asks torch for the offer and
resolves ``train.device``, ``train.amp`` and ``train.augment_on`` of one
experiment; the engine calls it once per train/recalibrate/predict call.

Rules (README, "Running on a GPU"):

* ``device: auto`` is the first CUDA device when torch sees one, else the
  CPU; ``cuda``/``cuda:N`` without that device is an error naming the key
  (a silent CPU fallback would turn a 10-minute fold into a 5-hour one).
* ``amp: auto`` is bf16 on GPUs that support it (compute capability 8+),
  fp16 with a gradient scaler on older ones, and off on the CPU and under
  DP.  An explicit ``bf16``/``fp16`` where the device is the CPU is refused,
  not ignored: it names a precision the run cannot have.
* ``augment_on: auto`` is ``device`` (batched, :mod:`common.device_augment`)
  on CUDA and ``workers`` (MONAI per item, the original path) on the CPU,
  so CPU training is bitwise what it was.
* ``memory_format: auto`` is channels-last for the 2D network (the fast
  convolution path of oneDNN and cuDNN) and the default layout for 3D and
  under DP; ``channels_last`` asks it for both, ``contiguous`` for neither.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from .config import ConfigError, ExperimentConfig

Amp = Literal["off", "bf16", "fp16"]
AugmentOn = Literal["workers", "device"]
Layout = Literal["contiguous", "channels_last"]
_DEVICE = re.compile(r"(auto|cpu|cuda)(?::([0-9]+))?")


@dataclass(frozen=True)
class Offer:
    """What this process can use: CUDA devices (name, whether it does bf16) and the torch build."""

    cuda: tuple[tuple[str, bool], ...] = ()
    torch_version: str = ""
    cuda_build: str | None = None

    @classmethod
    def probe(cls) -> Offer:
        """Ask torch (cheap; no CUDA context is created when there is no GPU)."""
        devices: list[tuple[str, bool]] = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                devices.append((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)[0] >= 8))
        return cls(tuple(devices), torch.__version__, torch.version.cuda)


@dataclass(frozen=True)
class Runtime:
    """The resolved choice: where tensors live, which autocast dtype, where augmentation runs."""

    device: str  # "cpu" or "cuda:N"
    name: str  # "cpu" or the GPU's name
    amp: Amp = "off"
    augment_on: AugmentOn = "workers"
    layout_2d: Layout = "contiguous"
    layout_3d: Layout = "contiguous"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Autocast to the AMP dtype; a plain null context when AMP is off (the CPU path is untouched)."""
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (its range needs one); bf16 and full precision need none."""
        return torch.amp.GradScaler("cuda") if self.amp == "fp16" else None

    def layout(self, kind: str) -> Layout:
        """The layout a network of ``kind`` (``densenet2d``/``densenet3d``) runs in."""
        return self.layout_2d if kind == "densenet2d" else self.layout_3d

    def memory_format(self, kind: str) -> torch.memory_format:
        """:meth:`layout` as torch's memory format for that network's 4D or 5D tensors."""
        if self.layout(kind) == "contiguous":
            return torch.contiguous_format
        return torch.channels_last if kind == "densenet2d" else torch.channels_last_3d

    def describe(self) -> dict[str, str]:
        """What summary.json and the report say about where a site trained."""
        return {
            "device": self.device,
            "name": self.name,
            "amp": self.amp,
            "augment_on": self.augment_on,
            "layout": f"2d {self.layout_2d}, 3d {self.layout_3d}",
        }


def resolve(
    device: str,
    amp: str,
    augment_on: str,
    *,
    offer: Offer,
    dp: bool = False,
    key: str = "train.device",
    memory_format: str = "auto",
) -> Runtime:
    """The runtime for the requested settings on a machine that offers ``offer``; raises ``ConfigError``.

    ``key`` names the setting in errors (``train.device`` from a config,
    ``--device`` from a command line).
    """
    m = _DEVICE.fullmatch(device)
    if m is None:
        raise ConfigError(f"{key}: {device!r} is not one of auto, cpu, cuda, cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "auto" and index is not None:
        raise ConfigError(f"{key}: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if kind == "cuda":
        i = int(index or 0)
        if not offer.cuda:
            build = f"CUDA {offer.cuda_build}" if offer.cuda_build else "a CPU-only build"
            raise ConfigError(
                f"{key}: {device} requested but no CUDA device is visible (torch {offer.torch_version}, {build}); "
                "install a CUDA build of torch on a GPU machine, or use 'auto' or 'cpu'"
            )
        if i >= len(offer.cuda):
            raise ConfigError(
                f"{key}: {device} requested but only {len(offer.cuda)} CUDA device(s) are visible"
            )
    elif kind == "auto" and offer.cuda:
        i = 0
    else:
        i = -1
    on_cuda = i >= 0
    name, bf16 = offer.cuda[i] if on_cuda else ("cpu", False)
    chosen: Amp
    if amp == "auto":
        chosen = "off" if not on_cuda or dp else ("bf16" if bf16 else "fp16")
    elif amp in ("off", "bf16", "fp16"):
        if amp != "off" and not on_cuda:
            raise ConfigError(
                f"train.amp: {amp} needs a CUDA device but {key} resolved to the CPU; "
                "use 'auto' (off on the CPU) or 'off'"
            )
        if amp != "off" and dp:
            raise ConfigError(f"train.amp: {amp} is not compatible with DP-SGD: use 'off' or 'auto'")
        chosen = amp  # type: ignore[assignment]
    else:
        raise ConfigError(f"train.amp: {amp!r} is not one of auto, off, bf16, fp16")
    if augment_on not in ("auto", "workers", "device"):
        raise ConfigError(f"train.augment_on: {augment_on!r} is not one of auto, workers, device")
    where: AugmentOn = ("device" if on_cuda else "workers") if augment_on == "auto" else augment_on  # type: ignore[assignment]
    if memory_format not in ("auto", "contiguous", "channels_last"):
        raise ConfigError(f"train.memory_format: {memory_format!r} is not one of auto, contiguous, channels_last")
    if memory_format == "channels_last" and dp:
        raise ConfigError("train.memory_format: channels_last is not compatible with DP-SGD: use 'auto' or 'contiguous'")
    fast: Layout = "contiguous" if memory_format == "contiguous" or dp else "channels_last"
    return Runtime(
        device=f"cuda:{i}" if on_cuda else "cpu",
        name=name,
        amp=chosen,
        augment_on=where,
        layout_2d=fast,
        layout_3d="channels_last" if memory_format == "channels_last" else "contiguous",
    )


def for_config(cfg: ExperimentConfig, *, offer: Offer | None = None) -> Runtime:
    """The runtime of ``cfg``'s ``train.device``/``amp``/``augment_on``/``memory_format`` on this machine."""
    t = cfg.train
    return resolve(
        t.device, t.amp, t.augment_on, offer=offer or Offer.probe(), dp=cfg.dp.enabled, memory_format=t.memory_format
    )


@contextlib.contextmanager
def placed(
    model: torch.nn.Module, device: torch.device, layout: torch.memory_format = torch.contiguous_format
) -> Iterator[torch.nn.Module]:
    """Run a block with ``model`` on ``device`` in ``layout`` and give it back where it was, contiguous.

    Callers keep their models on the CPU in the default layout (codecs,
    checkpoints and state dicts read them there); on the CPU in the default
    layout this is a no-op.  Inputs need no conversion: a convolution whose
    weight is channels-last runs channels-last.
    """
    first = next(iter(model.parameters()), None)
    if first is None:  # nothing to move (a parameter-free module)
        yield model
        return
    home = first.device
    if layout == torch.contiguous_format:
        model.to(device)
    else:
        model.to(device, memory_format=layout)  # type: ignore[call-overload]  # documented, not in the stubs
    try:
        yield model
    finally:
        if layout == torch.contiguous_format:
            model.to(home)
        else:
            model.to(home, memory_format=torch.contiguous_format)  # type: ignore[call-overload]
