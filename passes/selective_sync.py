"""DICE's selective synchronisation: choose which MoE layers stay synchronous under a
stale plan. This is decided once per plan, not per graph: `compile` resolves the
strategy into the set of layers (`PassContext.synchronous_layers`), and the stale passes
(displace, interweave) leave those layers alone.

    deep       the deeper half (DICE's best: FID 5.74, vs 6.55 shallow, 5.95 staggered)
    shallow    the shallower half
    staggered  every other layer, starting with layer 1
    [i, ...]   exactly these layer indices
    auto       the most staleness-sensitive `fraction` of the layers, measured at compile
               time on the single-device model: one short calibration sample per layer in
               which only that layer consumes stale routed outputs (`resolve_auto`), with the
               plan's calibration sampler, guidance scale and seed
    none       every layer stale
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moedit.runtime.sampling import SAMPLERS, initial_noise, step_noise
from moedit.plan import Plan, PlanError

log = logging.getLogger(__name__)


def synchronous_layers(plan: Plan, num_layers: int) -> frozenset[int]:
    """The MoE layers `plan` keeps synchronous on stale steps (every layer under mode sync).
    Raises PlanError for layer indices the model does not have; "auto" must be resolved
    first (`resolve_auto`)."""
    strategy, half = plan.selective_sync.strategy, num_layers // 2
    if plan.staleness.mode == "sync":
        return frozenset(range(num_layers))
    if isinstance(strategy, list):
        bad = [i for i in strategy if not 0 <= i < num_layers]
        if bad:
            raise PlanError(f"selective_sync.strategy lists layers {bad}, but the model has MoE layers "
                            f"0..{num_layers - 1}; list indices in that range")
        return frozenset(strategy)
    chosen = {"none": set(), "deep": range(num_layers - half, num_layers), "shallow": range(half),
              "staggered": range(1, num_layers, 2)}
    assert strategy in chosen, f"selective_sync.strategy {strategy!r} must be resolved before compiling"
    return frozenset(chosen[strategy])


# -- auto: calibrate on the single-device model ----------------------------------------

def _slot_outputs(adapter, moe, tokens, expert_ids) -> torch.Tensor:
    """[T,K,H]: each slot's expert output, unweighted."""
    experts = adapter.experts(moe)
    out = tokens.new_zeros((*expert_ids.shape, tokens.shape[-1]))
    for slot in range(expert_ids.shape[1]):
        for e in expert_ids[:, slot].unique().tolist():
            if e < 0:  # an empty slot (expert choice): zero
                continue
            rows = expert_ids[:, slot] == e
            out[rows, slot] = experts[e](tokens[rows])
    return out


def _stale_hook(layer, delay: int):
    """A forward hook that makes one MoE layer consume routed outputs `delay` steps old
    (scaled by the current router weights), as the stale plans do; shared expert current."""
    history: list[torch.Tensor] = []

    def hook(moe, inputs, kwargs, _output):
        x, extra = inputs[0], inputs[1:]  # the layer's inputs after its tokens go to route and combine
        tokens = x.flatten(0, -2)
        expert_ids, weights = layer.adapter.route(moe, tokens, *extra, **kwargs)
        expert_ids = expert_ids.long()
        history.append(_slot_outputs(layer.adapter, moe, tokens, expert_ids))
        slots = history[max(0, len(history) - 1 - delay)]
        routed = (slots * weights.masked_fill(expert_ids < 0, 0).unsqueeze(-1).to(slots.dtype)).sum(1)
        shared = layer.adapter.shared_expert(moe)
        merged = layer.adapter.combine(moe, routed, None if shared is None else shared(tokens), *extra, **kwargs)
        return layer.adapter.output(moe, merged.reshape(x.shape))

    return hook


def calibration_inputs(model: nn.Module, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration run's noise and class labels, on the device of the model's first
    parameter (a model already on its GPU runs there). The noise is drawn from a CPU generator
    seeded by `selective_sync.calibration_seed` and then moved, so it is the same on every
    rank and every device."""
    cfg, sel = model.config, plan.selective_sync
    device = next(model.parameters()).device
    labels = torch.arange(sel.calibration_images) % cfg.num_classes
    noise = initial_noise(len(labels), cfg.in_channels, cfg.input_size, seed=sel.calibration_seed)
    return noise.to(device), labels.to(device)


@torch.no_grad()
def staleness_sensitivity(model: nn.Module, layers, plan) -> list[float]:
    """Per MoE layer: relative L2 change of the sampled images when only that layer is stale
    (by the plan's staleness: 1 step interweaved, 2 displaced), on a short calibration run
    with the plan's `selective_sync.calibration_*` sampler, guidance scale and seed."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "in_channels"):
        raise PlanError("selective_sync.strategy 'auto' calibrates by sampling, which needs a DiT-style model with "
                        "a `config`; give an explicit list of layers instead")
    if any(p.is_meta for p in model.parameters()):
        raise PlanError("selective_sync.strategy 'auto' needs the model's real weights (it is on the meta device); "
                        "load them before compiling, or give an explicit list of layers")
    sel = plan.selective_sync
    noise, labels = calibration_inputs(model, plan)
    delay = 2 if plan.staleness.mode == "displaced" else 1
    log.info("selective_sync auto: calibrating on %d images, %d steps of the %r sampler at cfg scale %g, seed %d, on "
             "%s, layer by layer %d step(s) stale (set selective_sync.calibration_sampler and calibration_cfg_scale "
             "to how the model is sampled)", len(labels), sel.calibration_steps, sel.calibration_sampler,
             sel.calibration_cfg_scale, sel.calibration_seed, noise.device, delay)

    def sample():
        return SAMPLERS[sel.calibration_sampler](
            model, noise, labels, steps=sel.calibration_steps, cfg_scale=sel.calibration_cfg_scale,
            null_class=cfg.num_classes, noise=step_noise(len(labels), cfg.in_channels, cfg.input_size,
                                                         sel.calibration_seed))

    exact = sample()
    sensitivity = []
    for layer in layers:
        hook = _stale_hook(layer, delay)
        handle = model.get_submodule(layer.path).register_forward_hook(hook, with_kwargs=True)
        try:
            sensitivity.append(((sample() - exact).norm() / exact.norm()).item())
        finally:
            handle.remove()
    return sensitivity


def resolve_auto(model: nn.Module, layers, plan):
    """For strategy "auto": the plan with the measured layer list in its place, and the
    sensitivities. Any other plan comes back unchanged (and None).

    Deterministic across ranks: each rank calibrates on its own, but on the same weights, the
    same noise (same `calibration_seed`, drawn on the CPU, see `calibration_inputs`) and the
    same run, and equal sensitivities go to the lower layer index; so the same seed gives the
    same layers on every rank. (Should nondeterministic GPU kernels still split a near tie,
    the ranks' programs differ and the runtime's check of the collective order across ranks
    fails at start rather than hanging.)"""
    if plan.selective_sync.strategy != "auto":
        return plan, None
    sensitivity = staleness_sensitivity(model, layers, plan)
    keep = round(plan.selective_sync.fraction * len(layers))
    chosen = sorted(sorted(range(len(layers)), key=lambda i: (-sensitivity[i], i))[:keep])
    data = plan.to_dict()
    data["selective_sync"] = {"strategy": chosen}  # the calibration settings have done their work
    log.info("selective_sync auto: sensitivities %s -> synchronous layers %s",
             [round(s, 4) for s in sensitivity], chosen)
    return Plan(**data), sensitivity
