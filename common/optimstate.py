"""An Adam state carried from one local training to the next (``train.keep_optimizer_state``).

Kept apart from the training loop because it is a file format: a site saves
the state after a round and loads it before the next (``client.optimstore``),
so whatever is loaded must be checked against the model before it is trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class OptimizerStateError(ValueError):
    """A saved optimiser state that does not fit the model being trained."""


def load_optimizer_state(opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Resume ``opt`` from ``state``; :class:`OptimizerStateError` when it does not fit its parameters.

    The moments are copied (torch would alias the caller's tensors and update
    them in place) and moved to each parameter's device.  The learning rate is
    the schedule's, set before every step, so the saved one does not matter.
    """
    try:
        opt.load_state_dict(detached_state(dict(state)))
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise OptimizerStateError(f"the saved optimiser state does not fit this model: {exc}") from exc
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and value.shape != p.shape:
                    raise OptimizerStateError(
                        f"the saved optimiser state does not fit this model: {key} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)}"
                    )


def detached_state(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of an optimiser's ``state_dict`` (the live one aliases its tensors)."""
    moments = {
        i: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return {"state": moments, "param_groups": [dict(g) for g in state["param_groups"]]}
