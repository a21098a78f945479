"""ScMoE's shortcut schedule (plan `shortcut.enabled: true`): 0 steps stale on ScMoE models.

In an ScMoE model (models/scmoe.py; REFERENCE.md, "ScMoE") block l's routed MoE reads a
representation of block l-1, so nothing of block l's backbone (attention, shared
expert) waits for it, nor it for them. `shortcut` reorders each synchronous layer's nodes
(never changes one, so the outputs are bit-identical to the unscheduled program):

    1. route, permute, counts start             as early as their inputs allow
    2. counts wait, dispatch start              in the window's best slot j (below)
    3. dispatch wait, experts, combine start    in its best slot k >= j
    4. combine wait, unpermute, merge           as late as their first consumer allows

The window W is the backbone work between 1 and 4. ScMoE's rule places the experts so
that the dispatch and the combine both land behind compute; here the counts' latency A
is hidden too. With D and C the dispatch's and the combine's time in flight and E the
experts' time, (j, k) minimises the compute lane's time to the combine wait:

    issued = max(A, time(W[:j]))                  the dispatch starts
    ran    = max(issued + time(W[j:k]), issued + D) + E
    total  = max(ran + time(W[k:]), ran + C)

(the costs are the schedule pass's: measured from `schedule.profile`, else estimated;
each layer is placed on its own, and the link's queue shared by neighbouring layers'
exchanges is not modelled).
A layer's counts move to the "counts" communicator, so that a layer's counts never queue
behind the previous layer's dispatch or combine still in flight (see [Note: channels]).

On a standard model the MoE reads its own block's attention output, so there is no
window: the plan is refused, unless `shortcut.rewrite: true` asks `shortcut_rewrite` to
feed each MoE from the shortcut position instead. That changes the model (its outputs
differ from the original's), so explain() marks it lossy and the quality table reports it.

Layers that run stale on a step (DICE's modes) are left to those passes: their exchanges
already cross steps.
"""

from __future__ import annotations

import collections

import networkx as nx
import torch.fx as fx

from moedit.graph import META, Inserted, Kind, LayerNodes, NodeMeta, kind_of, meta
from moedit.pipeline import PassContext, PassResult
from moedit.plan import PlanError
from moedit.runtime.regions import region
from moedit.tracer import attention_nodes, moe_nodes

from ._stale import COUNTS
from .schedule import costs, program_dag

# -- which layers have a window --------------------------------------------------------


def _block_input(node: fx.Node) -> fx.Node:
    """The residual-stream value that feeds `node`'s input through norm and modulation: the
    nearest token value upstream that is also read by something downstream of `node` (the
    residual add `x + gate * f(...)`)."""
    downstream = _descendants(node)
    frontier, seen = [node.args[0]], set()
    while frontier:
        value = frontier.pop(0)
        if value in seen or not isinstance(value, fx.Node):
            continue
        seen.add(value)
        if any(user in downstream for user in value.users):
            return value
        frontier += value.all_input_nodes
    raise PlanError(f"shortcut: cannot find the residual stream feeding {node.target!r} (no value upstream of it "
                    "is also added to its output); moedit's shortcut passes need pre-norm residual blocks")


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reach(node, lambda n: n.users)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reach(node, lambda n: n.all_input_nodes)


def _reach(node: fx.Node, neighbours) -> set[fx.Node]:
    """Every node reachable from `node` (itself excluded) through `neighbours`."""
    found, stack = set(), list(neighbours(node))
    while stack:
        other = stack.pop()
        if other not in found:
            found.add(other)
            stack += neighbours(other)
    return found


def _block_path(target: str) -> str:
    parts = target.split(".")
    indexed = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: indexed[-1] + 1]) if indexed else ""


def _first_attention(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Each block's first attention node (the one that reads the block's input), by block path."""
    first: dict[str, fx.Node] = {}
    for node in attention_nodes(gm):
        first.setdefault(_block_path(node.target), node)
    return first


def standard_layers(gm: fx.GraphModule) -> list[int]:
    """The MoE layers that read their own block's attention output (no shortcut)."""
    attention = _first_attention(gm)
    standard = []
    for node in moe_nodes(gm):
        own = attention.get(_block_path(node.target))
        if own is not None and own in _ancestors(node):
            standard.append(meta(node)["layer"])
    return standard


# -- the lossy rewrite for standard models ---------------------------------------------

def shortcut_rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Feed every MoE layer but the first from the shortcut position of the block before it:
    the nodes between the block's residual stream and the MoE input are copied onto the
    shortcut value (Pos-1: the block's input; Pos-2: the previous block's post-attention
    residual; Pos-3: the previous block's input)."""
    settings = ctx.plan.shortcut
    if not (settings.enabled and settings.rewrite):
        return PassResult(gm, False, [])
    by_block = _first_attention(gm)
    moes = moe_nodes(gm)
    blocks = [_block_path(moe.target).rpartition(".") for moe in moes]  # (stack, ".", index)
    if any(a[0] != b[0] or not a[2] or int(b[2]) != int(a[2]) + 1 for a, b in zip(blocks, blocks[1:])):
        blocks = ["".join(b) for b in blocks]
        raise PlanError(f"shortcut.rewrite needs an MoE layer in every block of one stack, in order; the MoE layers "
                        f"are in {blocks}")
    # Read every position off the unchanged graph first: rewriting layer l changes what
    # feeds layer l's MoE, which layer l+1's Pos-2 would otherwise follow.
    residual = [_block_input(moe) for moe in moes]
    block_input = [_block_input(by_block[_block_path(moe.target)]) for moe in moes]
    source = {1: block_input[1:], 2: residual[:-1], 3: block_input[:-1]}[settings.position]
    inserted = []
    for moe, stream, shortcut_value in zip(moes[1:], residual[1:], source):
        chain = _ancestors(moe) & _descendants(stream)
        copies = {stream: shortcut_value}
        with gm.graph.inserting_before(moe):
            for node in [n for n in gm.graph.nodes if n in chain]:
                copies[node] = gm.graph.node_copy(node, lambda n: copies.get(n, n))
                copies[node].meta = {**node.meta, META: NodeMeta(Kind.GLUE, meta(moe).layer)}
        moe.replace_input_with(moe.args[0], copies[moe.args[0]])
        inserted.append(Inserted(node=moe.name, layer=meta(moe)["layer"], kind="shortcut_input"))
    gm.graph.eliminate_dead_code()
    return PassResult(gm, bool(inserted), inserted)


# -- the schedule ----------------------------------------------------------------------

def shortcut(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.plan.shortcut.enabled:
        return PassResult(gm, False, [])
    layers = [view for view in (LayerNodes(gm, layer.index) for layer in ctx.layers) if _synchronous(view)]
    if not layers:
        return PassResult(gm, False, [])
    for view in layers:
        view[Kind.COUNTS_START].update_kwarg("channel", COUNTS)
    compute, flight = _costs(gm, ctx.plan.schedule.profile)
    order = _early_late_order(gm, layers)
    inserted = []
    for view in layers:
        slot = _place_experts(order, view, compute, flight)
        inserted.append(Inserted(node=view[Kind.EXPERTS].name, layer=view.layer, kind="shortcut_slot"))
        meta(view[Kind.DISPATCH_START]).shortcut = slot
    for before, node in zip(order, order[1:]):
        before.append(node)
    return PassResult(gm, True, inserted)


def _costs(gm: fx.GraphModule, profile: str | None) -> tuple[dict, dict]:
    """The schedule pass's costs, read in the program's current (traced) order, where they
    give each compute region's time to its first node; here the reordering splits regions,
    so a region's time is shared among its module calls (among all its nodes if it has none)."""
    nodes = list(gm.graph.nodes)
    compute, flight = costs(nodes, profile)
    members, current = collections.defaultdict(list), None
    for node in nodes:
        current = region(node) or current
        members[current].append(node)
    spread = {}
    for group in members.values():
        total = sum(compute.get(n, 0.0) for n in group)
        calls = [n for n in group if n.op == "call_module"] or group
        spread.update({n: total / len(calls) if n in calls else 0.0 for n in group})
    return spread, flight


def _synchronous(view: LayerNodes) -> bool:
    """Whether the layer exchanges and consumes its tokens within this program."""
    waits = view.all(Kind.COMBINE_WAIT)
    return len(waits) == 1 and len(view.all(Kind.DISPATCH_START)) == 1 and \
        kind_of(waits[0].args[1]) is Kind.COMBINE_START


def _middle(view: LayerNodes) -> list[fx.Node]:
    """Dispatch wait .. combine start: the nodes between the layer's two exchanges."""
    start, combine = view[Kind.DISPATCH_START], view[Kind.COMBINE_START]
    between = _descendants(start) & (_ancestors(combine) | {combine})
    return [n for n in view.nodes if n in between]


def _early_late_order(gm: fx.GraphModule, layers: list[LayerNodes]) -> list[fx.Node]:
    """A topological order in which what the dispatches need comes as early as it can and the
    middle and tail of each layer as late as their consumers allow (program order otherwise).
    Exchanges may change their issue order on a communicator: every rank's program is
    reordered alike (they differ only in which experts they hold)."""
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    late = set()
    for view in layers:
        late |= set(_middle(view)) | {view[Kind.COMBINE_WAIT]} | (_descendants(view[Kind.COMBINE_WAIT]) &
                                                                  set(view.nodes))
    # What feeds an earlier layer's dispatch goes before what feeds a later one's (at Pos-2,
    # block l's attention feeds layer l+1's dispatch, after layer l's has started).
    tier = {node: (1, 0) for node in nodes}
    for later, view in enumerate(reversed(layers)):
        start = view[Kind.DISPATCH_START]
        tier.update({node: (0, -later) for node in _ancestors(start) | {start}})
    tier.update({node: (2, 0) for node in late})
    dag = program_dag(gm, exchange_order=False)  # impure model code and cache accesses keep their order
    # Kahn's algorithm taking the ready node of lowest (placeholder first, tier, program position)
    return list(nx.lexicographical_topological_sort(dag, key=lambda n: (n.op != "placeholder", tier[n],
                                                                        position[n])))


def _place_experts(order: list[fx.Node], view: LayerNodes, compute: dict, flight: dict) -> dict:
    """Move the layer's dispatch (counts wait .. dispatch start) and middle (dispatch wait ..
    combine start) to their best slots in the window that follows its counts start (see the
    module docstring), in `order` (a list, edited in place); returns what the choice rested on."""
    dispatch, middle = view[Kind.DISPATCH_START], _middle(view)
    first = order.index(view[Kind.COUNTS_START]) + 1
    needed = _ancestors(dispatch) | {dispatch}
    issue = [n for n in order[first:] if n in needed]  # counts wait, splits, dispatch start
    for node in issue + middle:
        order.remove(node)
    end = order.index(view[Kind.COMBINE_WAIT])
    window = order[first:end]
    A, D, C = (flight.get(view[kind], 0.0) for kind in (Kind.COUNTS_START, Kind.DISPATCH_START, Kind.COMBINE_START))
    E = sum(compute.get(n, 0.0) for n in middle)
    before = [0.0]
    for node in window:
        before.append(before[-1] + compute.get(node, 0.0))

    def predicted(j: int, k: int) -> float:
        """Compute-lane time to the combine wait with the dispatch issued after window[:j] and
        the experts run after window[:k]; the lane stalls on every wait that has not landed."""
        issued = max(before[j], A)
        experts = max(issued + before[k] - before[j], issued + D)
        combined = experts + E
        return max(combined + before[-1] - before[k], combined + C)

    n = len(window)
    j, k = min(((j, k) for k in range(n + 1) for j in range(k + 1)), key=lambda jk: (predicted(*jk), jk))
    order[first + k:first + k] = middle
    order[first + j:first + j] = issue
    return {"window_s": before[-1], "counts_s": A, "dispatch_s": D, "combine_s": C, "experts_s": E,
            "before_dispatch_s": before[j], "before_experts_s": before[k], "predicted_s": predicted(j, k),
            "unscheduled_s": A + D + E + C + before[-1]}
