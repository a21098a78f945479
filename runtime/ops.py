"""The ops a moedit program calls for communication and for state that crosses steps.

Each op marked `stateful` takes the program's `run` input first (see [Note: the run
input] in moedit/graph.py) and is registered with `torch.fx.node.has_side_effect`, so
dead-code elimination keeps it even when its result is unused.

    exchange_start(run, rows, send_splits, recv_splits, ...) -> Pending   all-to-all, variable splits
                                                                            (rows packed in a wire dtype)
    counts_start(run, send_counts, ...)                        -> Pending   all-to-all of [P, L] counts
    gather_start(run, piece, ...)                              -> Pending   all-gather, [G, *piece.shape]
    ring_start(run, block, ...)                                -> Pending   send to the next rank, receive
                                                                            from the previous one
    send_start(run, tensor, peer=..., tag=...) / recv_start(run, buffer, peer=..., tag=...)
                                                               -> Pending   point to point (PipeFusion)
    broadcast_start(run, tensor, root=...)                     -> Pending   the root's tensor to every rank
    wait(run, pending)                                         -> Tensor    see [Note: async handles]
    cache_write(run, value, key=...) / cache_read(run, key=...)             values kept across steps
    slot_outputs(run, returned, order, weights, key=...)       -> [T, H]    unpermute for conditional comm
    in_flight(pending, order, send_counts, recv_counts)        -> InFlight  an exchange with its bookkeeping
    ready(tensor)                                              -> Pending   a finished exchange
    expert_fetch(run, recv_counts, ...)                        -> Fetch     offloading: copy the needed experts in

Why plain functions rather than `torch.library` custom ops: they take the run and return
work handles, neither of which is a tensor; torch's own functional collectives instead
bake a process-group name into the graph, which would tie a program to one run.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.fx.node import has_side_effect

from .cache import InFlight
from .comm import MAIN, P2P, Exchange, Pending, WorkGroup
from .expert_ops import rows_per_expert, unpermute
from .offload import Fetch
from .state import RunState
from .wire import wire_of


STATEFUL: set = set()  # every op marked with @stateful


def stateful(fn):
    """Mark `fn` as an op that takes `run` first and must never be removed from a graph."""
    fn.stateful = True
    STATEFUL.add(fn)
    return has_side_effect(fn)


@stateful
def exchange_start(run: RunState, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], *,
                   name: str, layer: int | None, axis: str, channel: str = MAIN, wire: str | None = None,
                   wire_block: int = 128) -> Pending:
    """Start an all-to-all: rows [sum(send_splits), ...] are cut by `send_splits` (one count
    per destination rank) and rows arrive by `recv_splits`. `wire` ("bfloat16", "float16",
    "float8"): the rows travel packed in that dtype and are expanded at the wait (see
    [Note: wire dtypes] in moedit/runtime/wire.py)."""
    exchange = Exchange(name, layer, axis, channel)
    codec = wire_of(wire, wire_block)
    send = rows.contiguous() if codec is None else codec.encode(rows)
    output = send.new_empty((sum(recv_splits), *send.shape[1:]))
    group = run.group(exchange)
    work = dist.all_to_all_single(output, send, recv_splits, send_splits, group=group, async_op=True)
    run.sent_bytes += (sum(send_splits) - send_splits[group.rank()]) * math.prod(send.shape[1:]) * send.element_size()
    expand = None if codec is None else functools.partial(codec.decode, dtype=rows.dtype, shape=tuple(rows.shape[1:]))
    return run.issued(Pending(output, work, exchange, expand))


@stateful
def counts_start(run: RunState, send_counts: torch.Tensor, *, layer: int, axis: str, channel: str = MAIN) -> Pending:
    """Start the all-to-all of per-(rank, local expert) token counts, [P, L] -> [P, L]: the
    receiver needs them before it can size the dispatch buffers."""
    exchange = Exchange("counts", layer, axis, channel)
    recv_counts = torch.empty_like(send_counts)
    work = dist.all_to_all_single(recv_counts, send_counts, group=run.group(exchange), async_op=True)
    return run.issued(Pending(recv_counts, work, exchange))


@stateful
def gather_start(run: RunState, piece: torch.Tensor, *, name: str, layer: int | None, axis: str,
                 channel: str = MAIN) -> Pending:
    """Start an all-gather of every rank's `piece` (all of one shape) into [G, *piece.shape], in group order."""
    exchange = Exchange(name, layer, axis, channel)
    group = run.group(exchange)
    output = piece.new_empty((group.size(), *piece.shape))
    work = dist.all_gather(list(output.unbind(0)), piece.contiguous(), group=group, async_op=True)
    run.sent_bytes += (group.size() - 1) * piece.numel() * piece.element_size()
    return run.issued(Pending(output, work, exchange))


@stateful
def ring_start(run: RunState, block: torch.Tensor, *, name: str, layer: int | None, axis: str,
               channel: str = MAIN) -> Pending:
    """One turn of a ring: send `block` to the next rank of the group and receive the
    previous rank's block of the same shape (both point to point, started together)."""
    exchange = Exchange(name, layer, axis, channel)
    group = run.group(exchange)
    me, size = group.rank(), group.size()
    output = torch.empty_like(block)
    works = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, block.contiguous(), dist.get_global_rank(group, (me + 1) % size), group),
        dist.P2POp(dist.irecv, output, dist.get_global_rank(group, (me - 1) % size), group),
    ])
    run.sent_bytes += block.numel() * block.element_size()
    return run.issued(Pending(output, WorkGroup(works), exchange))


@stateful
def send_start(run: RunState, tensor: torch.Tensor, *, peer: int, tag: int, name: str, layer: int | None, axis: str,
               channel: str = P2P) -> Pending:
    """Start sending `tensor` to the rank at place `peer` of the `axis` group; the wait returns it."""
    exchange = Exchange(name, layer, axis, channel)
    group = run.group(exchange)
    tensor = tensor.contiguous()
    work = dist.isend(tensor, dist.get_global_rank(group, peer), group=group, tag=tag)
    run.sent_bytes += tensor.numel() * tensor.element_size()
    return run.issued(Pending(tensor, work, exchange))


@stateful
def recv_start(run: RunState, buffer: torch.Tensor, *, peer: int, tag: int, name: str, layer: int | None, axis: str,
               channel: str = P2P) -> Pending:
    """Start receiving into `buffer` what the rank at place `peer` of the `axis` group sends with `tag`."""
    exchange = Exchange(name, layer, axis, channel)
    group = run.group(exchange)
    work = dist.irecv(buffer, dist.get_global_rank(group, peer), group=group, tag=tag)
    return run.issued(Pending(buffer, work, exchange))


@stateful
def broadcast_start(run: RunState, tensor: torch.Tensor, *, root: int, name: str, layer: int | None, axis: str,
                    channel: str = MAIN) -> Pending:
    """Start a broadcast of the `tensor` of the rank at place `root` of the `axis` group; on the
    other ranks `tensor` is the buffer it lands in."""
    exchange = Exchange(name, layer, axis, channel)
    group = run.group(exchange)
    tensor = tensor.contiguous()
    work = dist.broadcast(tensor, dist.get_global_rank(group, root), group=group, async_op=True)
    if group.rank() == root:
        run.sent_bytes += (group.size() - 1) * tensor.numel() * tensor.element_size()
    return run.issued(Pending(tensor, work, exchange))


@stateful
def wait(run: RunState, pending: Pending) -> torch.Tensor:
    """Block until an exchange started earlier has landed, then return its buffer."""
    return run.wait(pending)


@stateful
def cache_write(run: RunState, value, *, key: str) -> None:
    run.cache.write(key, value)


@stateful
def cache_read(run: RunState, *, key: str):
    return run.cache.read(key)


@stateful
def slot_outputs(run: RunState, returned: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, *,
                 key: str) -> torch.Tensor:
    """Conditional communication's unpermute: the weighted sum of each token's K slot outputs,
    taking the slots that were not sent from the outputs cached when all K were last sent,
    and caching all K whenever they were. ([T*K,H] rows in, [T,H] out, as `unpermute`.)"""
    num_tokens, top_k = weights.shape
    if order.numel() == num_tokens * top_k:  # every slot was sent: refresh the cache
        slots = returned.new_empty((num_tokens * top_k, returned.shape[-1]))
        routed = unpermute(returned, order, weights, slots=slots)
        run.cache.write(key, slots)
        return routed
    return unpermute(returned, order, weights, slots=run.cache.read(key).clone())


@stateful
def expert_fetch(run: RunState, recv_counts: torch.Tensor, *, layer: int, expert_ids: list[int]) -> Fetch:
    """Offloading: start copying this rank's experts that receive rows ([P, L] counts) to the
    device; the experts node runs on the copies (see moedit/runtime/offload.py)."""
    rows = rows_per_expert(recv_counts)
    return run.experts.fetch(layer, [e for e, n in zip(expert_ids, rows) if n])


EXCHANGE_STARTS = (exchange_start, counts_start, gather_start, ring_start, send_start, recv_start,
                   broadcast_start)  # each returns a Pending


def in_flight(pending: Pending, order, send_counts, recv_counts) -> InFlight:
    return InFlight(pending, order, send_counts, recv_counts)


def ready(tensor: torch.Tensor) -> Pending:
    """A finished exchange: the synchronous program fills the stale layers' caches with these."""
    return Pending(tensor, None)

