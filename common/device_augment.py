"""Batched random augmentation on the training device (rotation, translation, scaling, flip).

The CPU path augments one item at a time with MONAI in the DataLoader
(``common.transforms.random_3d``/``random_2d``); at 96^3 that keeps a GPU
waiting most of each epoch.  :class:`BatchAugment` draws the same kinds of
transforms for a whole (B, C, *spatial) batch and applies them with one
``affine_grid`` + ``grid_sample`` on the batch's device.

* Same distribution as the MONAI path (``AugmentConfig``): with probability
  ``prob`` an affine (rotation about every axis in 3D, in-plane in 2D,
  translation up to ``translate_frac * size`` voxels, per-axis scale
  ``1 +- scale_frac``), then, independently with ``prob``, a flip of the
  first spatial axis (left-right).  Padding is 0 (air).
* Channel-agnostic: every channel of a sample gets that sample's transform.
  Channels listed in ``nearest_channels`` (e.g. an ROI mask channel) are
  resampled with nearest-neighbour interpolation and stay binary.
* Deterministic given the ``torch.Generator`` (a CPU one): parameters are
  drawn on the CPU and moved, so the draw does not depend on the device.

Geometry (:func:`affine_grid_theta`): a matrix ``M`` and shift ``t`` in
voxel units about the volume's centre, ordered like the tensor's spatial
axes, map each *output* voxel to the *input* point it reads:
``in = M @ out + t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .config import AugmentConfig


@dataclass(frozen=True)
class Draw:
    """One batch's random parameters: ``matrix`` (B, n, n), ``shift`` (B, n) voxels, ``affine``/``flip`` (B,) bool."""

    matrix: torch.Tensor
    shift: torch.Tensor
    affine: torch.Tensor
    flip: torch.Tensor


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices: (B,) in-plane angles -> (B, 2, 2); (B, 3) angles about axes 0, 1, 2 -> (B, 3, 3)."""
    if angles.ndim == 1:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    out = torch.eye(3, dtype=angles.dtype).expand(len(angles), 3, 3)
    for axis in range(3):
        a, b = [k for k in range(3) if k != axis]
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        r = torch.eye(3, dtype=angles.dtype).repeat(len(angles), 1, 1)
        r[:, a, a], r[:, a, b], r[:, b, a], r[:, b, b] = c, -s, s, c
        out = r @ out
    return out


def affine_grid_theta(matrix: torch.Tensor, shift: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """``affine_grid``'s theta (B, n, n+1) for ``in = matrix @ out + shift`` in centred voxel units.

    ``affine_grid`` works in normalised coordinates (``align_corners=False``:
    ``u = 2 (v + 0.5) / S - 1``, i.e. ``v_centred = u * S / 2``) with its
    components in reversed axis order (x is the last tensor axis).
    """
    n = len(spatial)
    half = torch.tensor([s / 2.0 for s in spatial], dtype=matrix.dtype, device=matrix.device)
    m = matrix / half[None, :, None] * half[None, None, :]
    t = shift / half
    rev = list(range(n - 1, -1, -1))
    m = m[:, rev][:, :, rev]
    return torch.cat([m, t[:, rev, None]], dim=2)


def warp(
    x: torch.Tensor, theta: torch.Tensor, nearest_channels: frozenset[int] = frozenset()
) -> torch.Tensor:
    """Resample every channel of ``x`` (B, C, *spatial) through ``theta``; zero padding."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    near = sorted(c for c in nearest_channels if 0 <= c < x.shape[1])
    if near:
        out[:, near] = F.grid_sample(
            x[:, near], grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
    return out


class BatchAugment:
    """Random affine + left-right flip of a (B, C, *spatial) batch, on the batch's device."""

    def __init__(self, cfg: AugmentConfig, ndim: int, nearest_channels: Sequence[int] = ()) -> None:
        if ndim not in (2, 3):
            raise ValueError(f"BatchAugment works on 2D or 3D images, got ndim={ndim}")
        self.cfg = cfg
        self.ndim = ndim
        self.nearest_channels = frozenset(int(c) for c in nearest_channels)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled and self.cfg.prob > 0

    def draw(self, batch: int, spatial: Sequence[int], generator: torch.Generator) -> Draw:
        """Parameters for ``batch`` samples of shape ``spatial`` (CPU tensors, float32)."""
        cfg, n = self.cfg, self.ndim

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator) * 2.0 - 1.0

        affine = torch.rand(batch, generator=generator) < cfg.prob
        angle = math.radians(cfg.rotate_deg)
        rot = rotation(uniform(batch, 3) * angle if n == 3 else uniform(batch) * angle)
        scale = 1.0 + uniform(batch, n) * cfg.scale_frac
        sizes = torch.tensor([float(s) for s in spatial])
        shift = uniform(batch, n) * cfg.translate_frac * sizes
        flip = torch.rand(batch, generator=generator) < cfg.prob
        if not cfg.flip:
            flip = torch.zeros_like(flip)
        return Draw(matrix=rot @ torch.diag_embed(scale), shift=shift, affine=affine, flip=flip)

    def apply(self, x: torch.Tensor, d: Draw) -> torch.Tensor:
        """``x`` transformed by the draw ``d``: samples without an affine are copied, not resampled."""
        out = x
        if bool(d.affine.any()):
            theta = affine_grid_theta(d.matrix, d.shift, x.shape[2:])
            warped = warp(x, theta, self.nearest_channels)
            keep = d.affine.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            out = torch.where(keep, warped, x)
        if bool(d.flip.any()):
            flip = d.flip.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            out = torch.where(flip, out.flip(2), out)
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``x`` (B, C, *spatial); identity (``x`` itself) when augmentation is disabled."""
        if x.ndim != self.ndim + 2:
            raise ValueError(
                f"expected a (B, C, {'D, H, W' if self.ndim == 3 else 'H, W'}) batch, got {tuple(x.shape)}"
            )
        if not self.enabled:
            return x
        return self.apply(x, self.draw(x.shape[0], x.shape[2:], generator))
