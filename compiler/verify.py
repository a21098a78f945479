"""The verifier: the invariants every pass must leave intact, and the ones across programs.

`verify_graph(gm)`, after every pass:
* every exchange's moedit meta names the layer whose tokens it exchanges, and every offload
  fetch feeds only the experts of the layer it fetched (under interweaving a slot serves the
  previous layer: `NodeMeta.serves`);
* fx's own lint holds (every use after its definition, targets exist);
* every moedit op carries moedit meta naming its kind, and every exchange its layer, so
  explain() and the byte accounting see it; stateful ops read the program's `run` input;
* every `*_start` exchange has exactly one user: a `wait`, or an `in_flight` record or a
  cache write that carries it to a later step; every `wait` reads a start or a carried
  exchange (the `pending` field of a record, or a cache read of kind `pending`) - so no
  exchanged buffer is read before its exchange finished.

`verify_programs(programs)`: across one rank's programs, every cache key a program reads was
left by whichever kind of step can come before it; a cache read declares its staleness, and
the exact program reads nothing across steps.

`verify_staleness(programs, claimed)`: no node is staler than the plan claims for its layer,
and on stale steps each stale layer consumes a combine exactly that stale.

`verify_collective_order(orders, program, layout)`: across ranks, each communicator sees the
same exchanges in the same order within every group (collectives on one group complete in
issue order).
"""

from __future__ import annotations

import torch.fx as fx

from moedit.runtime import ops
from moedit.runtime.comm import MAIN, P2P

from .graph import STARTS, Kind, kind_of, meta, run_input
from .steps import StepKind

_STARTS = ops.EXCHANGE_STARTS


def verify_graph(gm: fx.GraphModule) -> None:
    """Raise RuntimeError naming the first node that breaks an invariant."""
    gm.graph.lint()
    run = run_input(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops.STATEFUL:
            if kind_of(node) is None:
                raise RuntimeError(f"moedit op {node.name!r} has no moedit meta; passes must tag what they insert")
            if not node.args or node.args[0] is not run:
                raise RuntimeError(f"stateful op {node.name!r} must take the program's `run` input first")
        if node.target in _STARTS and meta(node).serves != node.kwargs["layer"]:
            raise RuntimeError(f"exchange {node.name!r} exchanges layer {node.kwargs['layer']}'s tokens, but its "
                               f"moedit meta says it serves layer {meta(node).serves}; passes must annotate every "
                               "exchange they insert with the layer it serves")
        if kind_of(node) is Kind.FETCH:
            _verify_fetch(gm, node)
        if kind_of(node) in STARTS:
            users = list(node.users)
            if len(users) != 1 or users[0].target not in (ops.wait, ops.in_flight, ops.cache_write):
                raise RuntimeError(f"async node {node.name!r} must have exactly one user, a wait, an in_flight "
                                   f"record or a cache write; it has {[u.name for u in users]}")
        if node.op == "call_function" and node.target is ops.wait:
            pending = node.args[1]
            if not isinstance(pending, fx.Node) or kind_of(pending) not in STARTS | {Kind.PENDING}:
                raise RuntimeError(f"wait {node.name!r} must read an async start node or a carried exchange, "
                                   f"got {pending}")


def _cache_keys(gm: fx.GraphModule, op) -> set[str]:
    return {n.kwargs["key"] for n in gm.graph.nodes if n.op == "call_function" and n.target is op}


def verify_programs(programs: dict[StepKind, fx.GraphModule]) -> None:
    """Across one rank's programs (one per step kind), everything a program reads from the
    step cache was left by whichever step can come before it:

    * `cache_read` keys are written by every program (any kind of step can precede a stale one);
    * the slot caches a dropping program reads are written by every program that sends every
      slot (the last full step before it; a sample's first step never drops);

    and what a program reads across steps is declared stale: every cache read says how many
    steps old it is (staleness >= 1), and a synchronous program that drops no slot -- the
    exact one, a sample's first step -- reads no cache and holds no node declared stale.
    Conditional communication's slot outputs are the exception by design: a dropping step
    reuses them from the last full step, up to `conditional_comm.interval - 1` steps back,
    which the plan states; their nodes carry the staleness of the layer they sit in."""
    for kind, gm in programs.items():
        for node in gm.graph.nodes:
            stale = meta(node).staleness
            if node.target is ops.cache_read and stale < 1:
                raise RuntimeError(f"program {kind}: {node.name!r} reads a value an earlier step left but declares "
                                   f"staleness {stale}; passes must declare how many steps old what they read is")
            if kind.synchronous and not kind.drop and (stale or node.target is ops.cache_read):
                raise RuntimeError(f"program {kind} must be exact, but {node.name!r} "
                                   f"{'reads the step cache' if stale == 0 else f'is declared {stale} step(s) stale'}")
    for reader, gm in programs.items():
        for writer, written in programs.items():
            missing = _cache_keys(gm, ops.cache_read) - _cache_keys(written, ops.cache_write)
            if reader.drop and not writer.drop:
                missing |= _cache_keys(gm, ops.slot_outputs) - _cache_keys(written, ops.slot_outputs)
            if missing:
                raise RuntimeError(f"program {reader} reads cache keys {sorted(missing)} that program {writer} "
                                   "never writes; a step of that kind would leave them stale or empty")


def verify_staleness(programs: dict[StepKind, fx.GraphModule], claimed: dict[int, int]) -> None:
    """Stale reads match what the plan claims (`claimed`: MoE layer -> steps its routed output
    is stale on a stale step; 0 for layers kept synchronous). In every program no node serving
    a layer is staler than its claim, and on stale steps the combine a stale layer consumes is
    exactly that stale: explain(), the docs and the staleness probes all read the claim."""
    for kind, gm in programs.items():
        for node in gm.graph.nodes:
            info = meta(node)
            if info.serves is None or info.staleness <= claimed.get(info.serves, 0):
                continue
            raise RuntimeError(f"program {kind}: {node.name!r} serves layer {info.serves} and is declared "
                               f"{info.staleness} step(s) stale; the plan claims {claimed.get(info.serves, 0)}")
        if kind.synchronous:
            continue
        for node in gm.graph.nodes:
            info = meta(node)
            if kind_of(node) is Kind.COMBINE_WAIT and info.staleness != claimed.get(info.layer, 0):
                raise RuntimeError(f"program {kind}: layer {info.layer} consumes a combine declared {info.staleness} "
                                   f"step(s) stale ({node.name!r}); the plan claims {claimed.get(info.layer, 0)}")


def _verify_fetch(gm: fx.GraphModule, fetch: fx.Node) -> None:
    """Offloading: a fetch copies one layer's experts; each node it feeds must run that layer's."""
    fetched = fetch.kwargs["layer"]
    for user in fetch.users:
        runs = meta(user).serves
        module_layer = getattr(gm.get_submodule(user.target), "offload_layer", None) if user.op == "call_module" \
            else None
        if kind_of(user) is not Kind.EXPERTS or runs != fetched or module_layer not in (None, fetched):
            raise RuntimeError(f"fetch {fetch.name!r} copies layer {fetched}'s experts but feeds {user.name!r}, which "
                               f"runs layer {runs if module_layer is None else module_layer}'s")


def collective_order(gm: fx.GraphModule) -> dict[tuple[str, str], list[str]]:
    """Per communicator (axis, channel): the exchanges the program issues, in issue order."""
    order: dict[tuple[str, str], list[str]] = {}
    for node in gm.graph.nodes:
        if node.target in _STARTS:
            kw = node.kwargs
            name = kw.get("name", "counts")
            what = name if kw["layer"] is None else f"layer {kw['layer']} {name}"
            if node.target in (ops.send_start, ops.recv_start):
                what = f"{'send to' if node.target is ops.send_start else 'receive from'} {kw['peer']}, tag {kw['tag']}"
            order.setdefault((kw["axis"], kw.get("channel", MAIN)), []).append(what)
    return order


def verify_collective_order(orders: dict[int, dict[tuple[str, str], list[str]]], program: str, layout) -> None:
    """`orders[rank]` is `collective_order` of that rank's `program`; `layout` the plan's MeshLayout.
    On every communicator, each rank must issue what the first rank of its group there issues
    (ranks of different groups may differ: PipeFusion's stages hold different MoE layers).
    Point-to-point exchanges pair up instead: what a rank sends to a peer, the peer receives
    from it, tag for tag in one order. Raise RuntimeError at the first exchange where a rank
    differs, both sequences side by side."""
    _verify_pairs(orders, program, layout)
    comms = sorted({comm for order in orders.values() for comm in order if comm[1] != P2P})
    for rank in sorted(orders):
        for comm in comms:
            leader = layout.group_of(comm[0], rank)[0]
            if leader == rank or leader not in orders:
                continue
            a, b = orders[leader].get(comm, []), orders[rank].get(comm, [])
            if a != b:
                raise RuntimeError(_divergence(comm, program, leader, a, rank, b))


def _verify_pairs(orders: dict, program: str, layout) -> None:
    for rank, order in orders.items():
        for (axis, channel), entries in order.items():
            if channel != P2P:
                continue
            group = layout.group_of(axis, rank)
            for peer in set(group) & set(orders) - {rank}:
                sent = [e.rpartition("tag ")[2] for e in entries if e.startswith(f"send to {group.index(peer)},")]
                received = [e.rpartition("tag ")[2] for e in orders[peer].get((axis, channel), [])
                            if e.startswith(f"receive from {group.index(rank)},")]
                if sent != received:
                    raise RuntimeError(f"in the {program} program, rank {rank} sends to rank {peer} on mesh axis "
                                       f"{axis!r} with tags {sent}, but rank {peer} receives from it with tags "
                                       f"{received}; point-to-point pairs must match one for one, in order")


def _divergence(comm, program: str, rank_a: int, a: list[str], rank_b: int, b: list[str]) -> str:
    first = next(i for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i])
    axis, channel = comm
    where = f"mesh axis {axis!r}" + ("" if channel == MAIN else f" ({channel} communicator)")
    lines = [f"ranks {rank_a} and {rank_b} issue exchanges on {where} in a different order in the {program} program; "
             "collectives on one group complete in issue order, so they would deadlock or mix up data:",
             f"  {'#':>3}  {f'rank {rank_a}':<28}{f'rank {rank_b}':<28}"]
    for i in range(min(max(len(a), len(b)), first + 3)):
        left, right = (a[i] if i < len(a) else "-"), (b[i] if i < len(b) else "-")
        lines.append(f"  {i:>3}  {left:<28}{right:<28}{'<-- ERROR HERE' if i == first else ''}")
    return "\n".join(lines)
