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
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty; save the weights with torch.save(model.state_dict(), path)")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: our error says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() and _looks_pickled(path):
            raise CheckpointError(_refused(path, str(err))) from None
        raise CheckpointError(_not_a_checkpoint(path)) from None
    except Exception:  # noqa: BLE001 - torch's readers fail on a foreign file in many ways; all mean the same
        raise CheckpointError(_not_a_checkpoint(path)) from None


def _ends(path: str) -> tuple[bytes, bytes]:
    """The first two bytes of a non-empty file and its last one."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(-1, os.SEEK_END)
        return head, f.read(1)


def _not_a_checkpoint(path: str) -> str:
    """What to say of a file torch.load cannot read (never torch's own text, which may advise
    weights_only=False)."""
    head, _ = _ends(path)
    what = ("a zip file torch.save did not write, or one cut short" if head == b"PK" else
            "a pickle cut short or of another kind" if head[:1] == b"\x80" else "neither a zip nor a pickle")
    return (f"{path} is not a PyTorch checkpoint ({what}); give a file written by torch.save(model.state_dict(), "
            "path) or a .safetensors file")


def _looks_pickled(path: str) -> bool:
    """Whether `path` starts as torch.save's zip file or a pickle of protocol 2 or later does, or
    starts and ends as one of protocol 0 or 1 (a container or a global, then STOP)."""
    head, tail = _ends(path)
    return head == b"PK" or head[:1] == b"\x80" or (head[:1] in (b"(", b"]", b"}", b"c", b"l", b"d") and tail == b".")


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
    """The state dict inside `obj`: the first of the wrappers, at most a few deep."""
    for _ in range(4):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; "
                                  "save one with torch.save(model.state_dict(), path)")
        inner = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if inner is None:
            break
        obj = inner
    else:
        raise CheckpointError(f"{path}: the weights are wrapped more than 4 deep in {'/'.join(_WRAPPER_KEYS)}; "
                              "save the state dict itself")
    keys = [str(k)[:40] for k in list(obj)[:8]]
    if not all(isinstance(k, str) for k in obj) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is a dict but not a state dict of parameter names to tensors "
                              f"(top-level keys: {keys})")
    odd = next((k for k, v in obj.items() if v.is_meta or v.is_complex()), None)
    if odd is not None:
        kind = "a tensor without data (meta device)" if obj[odd].is_meta else f"a {obj[odd].dtype} tensor"
        raise CheckpointError(f"{path}: {odd} is {kind}; a checkpoint holds real-valued tensors with data")
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
