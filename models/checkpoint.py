"""Loading DiT-MoE checkpoints in the public key layout from a local file."""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

# Wrappers the training scripts of DiT and DiT-MoE save around the weights, most preferred first.
_WRAPPER_KEYS = ("ema", "model", "state_dict", "module")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def _unwrap(obj, path):
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; "
                              "save one with torch.save(model.state_dict(), path)")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            return _unwrap(obj[key], path)
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is a dict but not a state dict of tensors "
                              f"(top-level keys: {sorted(obj)[:8]})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _describe(keys, limit=6):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict saved in DiT-MoE's key layout into `model`, in place.

    Accepts a bare state dict or one wrapped under "ema", "model" or "state_dict";
    half-precision tensors are cast to the model's dtype. Missing or unexpected keys
    and shape mismatches raise `CheckpointError` naming the keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({err.__class__.__name__}: {err})") from err
    state = _unwrap(obj, path)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s): {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s): {_describe(unexpected)}")
        raise CheckpointError(f"{path} does not match the model ({'; '.join(problems)}); "
                              "check the config (depth, experts, attention flavour) it was trained with")
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path} has {len(wrong)} tensor(s) of the wrong shape: " + "; ".join(wrong[:4]))
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True)
    return model
