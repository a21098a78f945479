"""Displaced expert parallelism (DistriFusion-style, DICE's baseline): routed outputs are
2 steps stale.

At step t a stale layer starts the dispatch of its step-t tokens, runs its experts on
the rows dispatched at step t-1 and starts their combine, and consumes the combine
started at step t-1, which carries the expert outputs of its step t-2 tokens; the
current step's router weights scale them. Every exchange has a whole step to land.

After a synchronous step s the caches hold step s's own results, so step s+1 consumes
step s's outputs (1 step stale) and step s+2 the same outputs again (2 steps stale); from
then on the layer is exactly 2 steps behind. `tests/test_staleness.py` checks that rule.
"""

from __future__ import annotations

import torch.fx as fx

from moedit.pipeline import PassContext, PassResult

from ._stale import StaleSlot, cache_key, fill_from_sync, remove_exchange, stale_layers

STALENESS = 2


def displace(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.plan.staleness.mode != "displaced":
        return PassResult(gm, False, [])
    inserted = []
    for view in stale_layers(gm, ctx):
        dispatch_key, combine_key = cache_key(view.layer, "dispatch"), cache_key(view.layer, "combine")
        if ctx.step.synchronous:
            inserted += fill_from_sync(gm, view, combine_key, "returned")
            inserted += fill_from_sync(gm, view, dispatch_key, "received")
            continue
        with StaleSlot(gm, view, STALENESS, ctx.plan) as slot:
            counts = slot.start_counts()
            combine = slot.run_experts(slot.read(dispatch_key), owner=view)  # step t-1's tokens
            slot.consume_combine(slot.read(combine_key))                    # step t-2's outputs
            slot.write(combine_key, combine)
            slot.write(dispatch_key, slot.dispatch(counts))                  # step t's tokens
        remove_exchange(gm, view)
        inserted += slot.emit.inserted
    return PassResult(gm, bool(inserted), inserted)
