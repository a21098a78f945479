"""The graph verifier: the invariants every pass must leave intact.

* fx's own lint holds (every use after its definition, targets exist);
* every communication node carries moedit meta naming its layer, so explain() and the
  byte accounting see every exchange;
* every `*_start` communication node has exactly one user, a `wait`, and every `wait`
  reads a start node - so no exchanged buffer is read before its exchange finished
  (see [Note: async handles] in runtime/comm.py).
"""

from __future__ import annotations

import torch.fx as fx

from moedit.runtime.comm import Collective, wait

from .tracer import META

def _kind(node: fx.Node) -> str:
    return node.meta.get(META, {}).get("kind", "")


def verify_graph(gm: fx.GraphModule) -> None:
    """Raise RuntimeError naming the first node that breaks an invariant."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Collective):
            if "layer" not in node.meta.get(META, {}):
                raise RuntimeError(f"communication node {node.name!r} has no moedit layer meta; "
                                   "passes must annotate every exchange they insert")
        if _kind(node).endswith("_start"):
            users = list(node.users)
            if len(users) != 1 or users[0].target is not wait:
                raise RuntimeError(f"async node {node.name!r} must have exactly one user, a wait; "
                                   f"it has {[u.name for u in users]}")
        if node.op == "call_function" and node.target is wait:
            (pending,) = node.args
            if not isinstance(pending, fx.Node) or not _kind(pending).endswith("_start"):
                raise RuntimeError(f"wait {node.name!r} must read an async start node, got {pending}")
