"""Loading DiT-MoE checkpoints in the public key layout from a local file."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings

import torch
from torch import nn

# Wrappers the training scripts of DiT and DiT-MoE save around the weights, most preferred first.
_WRAPPER_KEYS = ("ema", "model", "state_dict", "module")
# [Note: what a checkpoint may unpickle]
# torch.load(weights_only=True) rebuilds only tensors and plain containers. DiT-MoE's train.py
# also saves its argparse.Namespace under "args", so that one class is allowed too, for the
# length of one load (a context, not torch's process-wide allow-list). Anything else (a
# custom class, a function) is refused: unpickling it could run arbitrary code.
_SAFE_GLOBALS = [argparse.Namespace]
_GLOBAL = re.compile(r"GLOBAL (\S+)", re.IGNORECASE)  # how torch's weights-only unpickler names what it refused
_OPERAND = re.compile(r"Unsupported operand (\d+)")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def _read(path: str) -> object:
    """The object in a `.safetensors` file or a `torch.save` file, unpickled safely."""
    if path.lower().endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: our error says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower() or not _looks_pickled(path):  # not refused: not a pickle
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (UnpicklingError: "
                                  f"{str(err).splitlines()[0]})") from None
        raise CheckpointError(_refused(path, str(err))) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({err.__class__.__name__}: {err})") from err


def _looks_pickled(path: str) -> bool:
    """Whether `path` starts as torch.save's zip file or as a pickle of protocol 2 or later does."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _refused(path: str, torch_message: str) -> str:
    """Why the weights-only unpickler refused `path`, in our words: torch's own message goes on to
    suggest weights_only=False, which would run whatever the file holds."""
    if (found := _GLOBAL.search(torch_message)) is not None:
        what = f"a pickled {found.group(1)}"
    elif (found := _OPERAND.search(torch_message)) is not None:
        what = f"pickle opcode {found.group(1)} (not a torch.save file, or one written with an unusual protocol)"
    else:
        what = "pickled data that is not tensors and plain containers"
    return (f"{path} was refused for safety: it contains {what}, and moedit unpickles only tensors, plain "
            "containers and argparse.Namespace, because any other object can run code while it loads; save the "
            "weights alone (torch.save(model.state_dict(), path) or a .safetensors file) and load that")


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(f"reading {path} needs the safetensors package: pip install safetensors") from err
    try:
        return load_file(path, device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a safetensors file ({err})") from err


def _select(obj, path, weights):
    """`obj[weights]`, the wrapper the caller asked for."""
    if not isinstance(obj, dict) or not isinstance(obj.get(weights), dict):
        found = sorted(k for k, v in obj.items() if isinstance(v, dict)) if isinstance(obj, dict) else []
        raise CheckpointError(f"{path} has no {weights!r} weights; its wrappers: {found or 'none'} "
                              "(leave weights=None to pick the first of ema, model, state_dict, module)")
    return obj[weights]


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


def load_checkpoint(model: nn.Module, path: str | os.PathLike, weights: str | None = None) -> nn.Module:
    """Load a state dict saved in DiT-MoE's key layout into `model`, in place.

    Accepts a `.safetensors` file or a `torch.save` file holding a bare state dict or one
    wrapped as DiT-MoE's train.py saves it ({"model", "ema", "opt", "args"}): the "ema"
    weights are chosen, then "model", "state_dict", "module"; `weights="model"` picks one.
    DDP's "module." prefix is dropped and half-precision tensors are cast to the model's
    dtype. Missing or unexpected keys and shape mismatches raise `CheckpointError` naming
    the keys; so does a pickle holding objects other than tensors, plain containers and
    argparse.Namespace (see [Note: what a checkpoint may unpickle]).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path!r}")
    obj = _read(path)
    state = _unwrap(obj if weights is None else _select(obj, path, weights), path)
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
