"""Checking a state dict against a model before loading it: one check for every weight file the project reads."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

#: Buffers that upstream checkpoints do not always save; missing ones keep the model's value.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_SHOWN = 20  # keys listed per kind in an error


def _listing(keys: list[str]) -> str:
    """At most ``_SHOWN`` keys, then how many more."""
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def fit_state_dict(model: nn.Module, state: Mapping, source: str | Path = "state dict",
                   exclude: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """``state`` with the DDP ``module.`` prefix removed and keys starting with ``exclude`` dropped, checked
    against ``model``: any missing, unexpected or wrongly shaped key is a ValueError that lists them."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(exclude))}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(exclude))}
    optional = {k for k in own if k.endswith(OPTIONAL_SUFFIXES)}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit {type(model).__name__}: missing keys {_listing(missing)}, "
                         f"unexpected keys {_listing(unexpected)}, wrong shapes {_listing(wrong)}")
    return state


def load_state_dict_checked(model: nn.Module, state: Mapping, source: str | Path = "state dict",
                            exclude: Sequence[str] = ()) -> nn.Module:
    """Load ``state`` into ``model`` after ``fit_state_dict`` (excluded keys keep the model's values)."""
    model.load_state_dict(fit_state_dict(model, state, source, exclude), strict=False)
    return model


def weights_digest(*modules: nn.Module, exclude: Sequence[str] = ()) -> str:
    """sha256 over every parameter and buffer (keys starting with ``exclude`` left out): equal digests =
    identical weights (DDP ranks, caches of a model's outputs)."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            if name.startswith(tuple(exclude)):
                continue
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
