"""The graph verifier: the invariants every pass must leave intact.

* fx's own lint holds (every use after its definition, targets exist);
* every communication node carries moedit meta naming its layer, so explain() and the
  byte accounting see every exchange;
* every `*_start` communication node has exactly one user: a `wait`, or an `in_flight`
  record that carries it to a later step; every `wait` reads a start node or the
  `pending` field of such a record - so no exchanged buffer is read before its exchange
  finished (see [Note: async handles] in runtime/comm.py);
* across a rank's programs, every cache key a program reads is written by every
  program, so whichever step came before has left it (`verify_programs`).
"""

from __future__ import annotations

import torch.fx as fx

from moedit.runtime.cache import CacheRead, CacheWrite, in_flight
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
            if len(users) != 1 or users[0].target not in (wait, in_flight):
                raise RuntimeError(f"async node {node.name!r} must have exactly one user, a wait or an in_flight "
                                   f"record; it has {[u.name for u in users]}")
        if node.op == "call_function" and node.target is wait:
            (pending,) = node.args
            carried = (isinstance(pending, fx.Node) and pending.target is getattr and pending.args[1] == "pending")
            if not isinstance(pending, fx.Node) or not (_kind(pending).endswith("_start") or carried):
                raise RuntimeError(f"wait {node.name!r} must read an async start node or a carried exchange, "
                                   f"got {pending}")


def _cache_keys(gm: fx.GraphModule, kind: type) -> set[str]:
    return {gm.get_submodule(n.target).key for n in gm.graph.nodes
            if n.op == "call_module" and type(gm.get_submodule(n.target)) is kind}


def verify_programs(programs: dict[str, fx.GraphModule]) -> None:
    """Every cache key read by any program is written by every program."""
    reads = {name: _cache_keys(gm, CacheRead) for name, gm in programs.items()}
    writes = {name: _cache_keys(gm, CacheWrite) for name, gm in programs.items()}
    for reader, keys in reads.items():
        for writer, written in writes.items():
            missing = keys - written
            if missing:
                raise RuntimeError(f"program {reader!r} reads cache keys {sorted(missing)} that program {writer!r} "
                                   "never writes; a step of that kind would leave them stale or empty")
