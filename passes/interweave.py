"""DICE's interweaved parallelism: routed outputs are 1 step stale, with the same
communication volume and overlap as displaced expert parallelism.

The stale layers a_0 .. a_{n-1} form a ring. In step t, a_j's slot

    * starts the dispatch of its step t tokens, for a_{j+1}'s slot;
    * waits for a_{j-1}'s dispatch (started by a_{j-1}'s slot earlier in this step),
      runs a_{j-1}'s experts on it and starts their combine, which a_{j-1} consumes at
      step t+1;
    * consumes its own combine, started by a_{j+1}'s slot at step t-1: its experts'
      outputs for its step t-1 tokens, scaled by this step's router weights.

The dispatch goes first because exchanges on one communicator complete in issue order and
it is the one needed within the step: behind a_{j-1}'s combine (needed a step later) it
landed later (benchmarks/overlap.py on the shaped link: 42 ms a step blocked, 32 with the
dispatch first).

a_0 closes the ring: it runs a_{n-1}'s experts on the rows a_{n-1} dispatched at step
t-1, and a_{n-1} consumes that combine later in the same step. Only the combines (and
a_{n-1}'s dispatch) cross a step boundary. After a synchronous step s, the caches hold
step s's own results, so every stale step is exactly 1 step behind.
"""

from __future__ import annotations

import torch.fx as fx

from moedit.pipeline import PassContext, PassResult

from ._stale import StaleSlot, cache_key, fill_from_sync, remove_exchange, stale_layers

STALENESS = 1
RING = "ring_dispatch"  # the last stale layer's dispatch, consumed by the first at the next step


def interweave(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.plan.staleness.mode != "interweaved":
        return PassResult(gm, False, [])
    ring = stale_layers(gm, ctx)
    inserted = []
    if ctx.step.synchronous:
        for j, view in enumerate(ring):
            if j < len(ring) - 1:
                inserted += fill_from_sync(gm, view, cache_key(view.layer, "combine"), "returned")
            else:
                inserted += fill_from_sync(gm, view, RING, "received")
        return PassResult(gm, bool(inserted), inserted)
    last = len(ring) - 1
    carried = None  # the previous slot's dispatch, within this step
    last_combine = None  # a_{n-1}'s combine, started by a_0's slot
    for j, view in enumerate(ring):
        previous = ring[j - 1]  # a_{n-1} for j == 0
        with StaleSlot(gm, view, STALENESS, ctx.plan) as slot:
            counts = slot.start_counts()
            previous_dispatch = slot.read(RING) if j == 0 else carried
            carried = slot.dispatch(counts)  # this layer's dispatch first: the next slot needs it
            combine = slot.run_experts(previous_dispatch, owner=previous)
            if j == 0:
                last_combine = combine
            else:
                slot.write(cache_key(previous.layer, "combine"), combine)
            own = last_combine if j == last else slot.read(cache_key(view.layer, "combine"))
            slot.consume_combine(own)
            if j == last:
                slot.write(RING, carried)
        remove_exchange(gm, view)
        inserted += slot.emit.inserted
    return PassResult(gm, bool(inserted), inserted)
