"""The signature of a call: what a captured program is specialised to (moedit/capture.py),
and how a call's tensors are found in its arguments and put back.

The graph's inputs are the tensors found in the call's arguments (nested lists, tuples and
dicts included, in `torch.utils._pytree` order), named after the forward's parameters. The
runtime binds every call with `Signature.of` to find its program; it needs nothing else of
the capture.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import torch
import torch.utils._pytree as pytree
from torch import nn


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a capture is specialised to: the call's structure, its non-tensor values, and
    the shape, dtype and device of each tensor."""

    spec: pytree.TreeSpec  # of (args, kwargs) bound to the forward's parameters
    leaves: tuple  # every leaf of the call, with None in each tensor's place
    places: tuple[int, ...]  # which leaves are tensors
    tensors: tuple[tuple[tuple[int, ...], torch.dtype, str], ...]  # their shape, dtype, device type
    names: tuple[str, ...] = dataclasses.field(compare=False)  # the graph's input names, one per tensor

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict) -> tuple["Signature", list[torch.Tensor]]:
        """The signature of calling `model(*args, **kwargs)` and the call's tensors, in the order a
        captured program takes them. Raises TypeError if the forward does not take these arguments."""
        parameters = inspect.signature(model.forward)
        bound = parameters.bind(*args, **kwargs)
        with_paths, spec = pytree.tree_flatten_with_path((bound.args, bound.kwargs))
        places = tuple(i for i, (_, leaf) in enumerate(with_paths) if isinstance(leaf, torch.Tensor))
        tensors = [with_paths[i][1] for i in places]
        names = _input_names([with_paths[i][0] for i in places], list(parameters.parameters))
        signature = cls(spec, tuple(None if i in places else leaf for i, (_, leaf) in enumerate(with_paths)), places,
                        _tensor_meta(tensors), names)
        return signature, tensors

    def with_tensors(self, tensors) -> "Signature":
        """The signature of this call with `tensors` in the tensors' places."""
        return dataclasses.replace(self, tensors=_tensor_meta(tensors))

    def call(self, tensors) -> tuple[tuple, dict]:
        """The forward's (args, kwargs), with `tensors` in the tensors' places."""
        leaves = list(self.leaves)
        for place, tensor in zip(self.places, tensors, strict=True):
            leaves[place] = tensor
        return pytree.tree_unflatten(leaves, self.spec)

    def describe(self) -> str:
        return ", ".join(f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}"
                         for name, (shape, dtype, _) in zip(self.names, self.tensors))


def _tensor_meta(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device.type) for t in tensors)


def _input_names(paths, parameters: list[str]) -> tuple[str, ...]:
    """Graph input names: the parameter's name, with the keys inside it if nested, e.g.
    `encoder_hidden_states_0`. A path is (0, position) for args or (1, name) for kwargs, then the keys inside."""
    names: list[str] = []
    for path in paths:
        top = path[1]
        base = str(top.key) if path[0].idx == 1 else parameters[top.idx] if top.idx < len(parameters) else \
            f"arg{top.idx}"
        name = re.sub(r"\W", "_", "_".join([base, *(str(getattr(k, "idx", getattr(k, "key", k))) for k in path[2:])]))
        names.append(name if name not in names else f"{name}_{len(names)}")
    return tuple(names)
