"""Compute regions: which part of a step a graph node belongs to, and the `mark` ops that open them.

A region is what a timeline's compute lane shows ("blocks.3.attn", "blocks.3 dense", "L3 experts",
"L3 wait dispatch"); the schedule and the shortcut pass order nodes by the same names, and the
simulator files its predicted spans under them. With profiling on, the executor runs a copy of each
program with a `mark` before the first node of each region (`instrument`); the mark tells the
rank's `Timeline` (runtime/timeline.py) that a new region starts.
"""

from __future__ import annotations

import torch.fx as fx

from moedit.graph import VALUES, Kind, copy_module, kind_of, meta, run_input, tag

from . import ops


@ops.stateful
def mark(run, name: str) -> None:
    """Graph op (profiling only): a new compute region starts here."""
    run.timeline.mark(name, run.step)


def region(node: fx.Node) -> str | None:
    """The compute region `node` belongs to ("blocks.3.attn", "blocks.3 dense", "L3 experts",
    "L3 wait dispatch", ...), or None for bookkeeping that belongs to whatever region it is in."""
    kind, info = kind_of(node), meta(node)
    if node.op in ("placeholder", "output") or kind in VALUES or kind is Kind.RUN:
        return None
    if kind is Kind.ATTENTION:
        return node.target
    if kind is not None and (info.layer is not None or info.where is not None):
        layer = info.serves  # a slot may run another layer's experts
        who = f"L{layer}" if layer is not None else info.where  # "a3": attention 3
        if node.target is ops.wait:
            return f"{who} wait {kind.value.removesuffix('_wait')}"
        return f"{who} {kind.value.removesuffix('_start')}"
    stack = node.meta.get("nn_module_stack")
    return f"{next(iter(stack))} dense" if stack else "dense"


def instrument(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with a `mark` before the first node of every compute region."""
    gm = copy_module(gm)
    run = run_input(gm)
    current = None
    for node in list(gm.graph.nodes):
        label = region(node)
        if label is None or label == current:
            continue
        current = label
        with gm.graph.inserting_before(node):
            tag(gm.graph.call_function(mark, (run, label)), kind=Kind.GLUE)
    gm.recompile()
    return gm
