"""The MoE-DiTs diffusers ships, unmodified, under sequence parallelism: HiDream-I1 (joint
image+text attention, then single-stream blocks over both), NucleusMoE-Image (text as added
K/V, expert-choice routing chosen over the whole image) and Flux (a dense MMDiT, the model
xDiT and diffusers' context parallelism target), each against its eager model; see
[Note: attention streams] in moedit/adapters.py and [Note: joint layouts] in
moedit/passes/sequence_parallel.py."""

import pytest
import torch

import moedit

pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[test]'")
from _diffusers import (BATCH_DIMS, FLUX_BATCH_DIMS, flux_inputs, hidream_inputs, nucleus_inputs,  # noqa: E402
                        tiny_flux, tiny_hidream, tiny_nucleus)

# model -> (builder, inputs(batch), batch_dims, has MoE layers); batch 3 also captures again
MODELS = {
    "hidream": (tiny_hidream, hidream_inputs, BATCH_DIMS, True),
    "nucleus": (tiny_nucleus, lambda b: nucleus_inputs(b, mask=b == 3), None, True),  # batch 3: a padded text mask
    "flux": (tiny_flux, flux_inputs, FLUX_BATCH_DIMS, False),
}
PLANS = {  # name -> (world, plan without expert parallelism); patch parallelism: every step synchronous
    "ulysses 2": (2, dict(sequence_parallel={"ulysses": 2})),
    "ring 2": (2, dict(sequence_parallel={"ring": 2})),
    "usp 2x2": (4, dict(sequence_parallel={"ulysses": 2, "ring": 2})),
    "patch 2": (2, dict(patch_parallel={"degree": 2, "warmup_steps": 1})),
    "pipefusion 2": (2, dict(pipefusion={"degree": 2, "patches": 2, "warmup_steps": 1})),  # each stage all experts
    "pipefusion 2, experts over 2 (data 2)": (4, dict(pipefusion={"degree": 2, "patches": 2, "warmup_steps": 1},
                                                      expert_parallel={"degree": 2})),
}


def _plan(name: str, moe: bool) -> moedit.Plan:
    """The plan with experts over every rank of a token split (PipeFusion: a stage's ranks)."""
    world, plan = PLANS[name]
    return moedit.Plan(**{"expert_parallel": {"degree": 1 if "pipefusion" in plan or not moe else world}, **plan})


def _worker(rank, world, model_name, plan_name, batches):
    build, inputs, batch_dims, moe = MODELS[model_name]
    compiled = moedit.compile(build(), _plan(plan_name, moe), example_inputs=inputs(batches[0]), batch_dims=batch_dims)
    outputs = []
    with compiled.to_runtime() as runner:
        for b in batches:
            runner.reset(steps=1)  # one synchronous step per sample (patch parallelism's warm-up)
            outputs.append(runner.denoise(**inputs(b))[0])
    return outputs


@pytest.mark.parametrize("model_name, plan_name", [(model, plan) for model in MODELS for plan in PLANS
                                                    if MODELS[model][3] or "expert_parallel" not in PLANS[plan][1]])
def test_split_plans_equal_the_eager_model(spawn, model_name, plan_name):
    build, inputs, _, _ = MODELS[model_name]
    model, batches = build(), [2, 3]
    with torch.no_grad():
        expected = [model(**inputs(b))[0] for b in batches]
    assert all(e.std() > 0.1 for e in expected)
    for outputs in spawn(PLANS[plan_name][0], _worker, model_name, plan_name, batches):
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_image_is_split_and_the_text_replicated():
    """HiDream's single-stream blocks hold [image, text] rows: each rank holds its half of the 16
    image tokens and all 17 text tokens; RoPE is cut to the same rows."""
    compiled = moedit.compile(tiny_hidream(), _plan("ulysses 2", True), example_inputs=hidream_inputs(2),
                              batch_dims=BATCH_DIMS)
    graph = compiled.graph(1)
    cuts = [n.args[1] for n in graph.graph.nodes if n.name.startswith("sp_shard")]
    assert (0, 16, 0, 1) in cuts and (0, 16, 17, 1) in cuts, cuts
    text_gathers = [n for n in graph.graph.nodes if n.kwargs.get("name", "").endswith("text output")]
    assert len(text_gathers) == 3  # one per attention: the text rows' outputs of this rank's heads


def test_expert_choice_chooses_over_the_whole_image():
    """NucleusMoE's experts pick their top-C tokens of each image: under a token split moedit
    gathers the router scores ([B, n, E] a rank) and chooses over all N tokens."""
    compiled = moedit.compile(tiny_nucleus(), _plan("ulysses 2", True), example_inputs=nucleus_inputs(2))
    gathers = [n for n in compiled.graph(0).graph.nodes if n.kwargs.get("name") == "gather of the router scores"]
    assert len(gathers) == 3 and all(n.kwargs["axis"] == "sp" for n in gathers)
    explained = compiled.explain()
    assert "expert choice over whole images: 3 layer(s) all-gather their router scores" in explained
    assert "joint attention: the image's tokens are split, the text tokens are on every rank" in explained


ATTENTIONS = ["double_stream_blocks.0.block.attn1", "single_stream_blocks.0.block.attn1",
              "single_stream_blocks.1.block.attn1"]


def _probe(runtime, watch, inputs, timestep: str, steps: int):
    """Run a `steps`-step sample with a different input and a falling timestep at every step;
    `watch(gm, record)` hooks the modules to watch, and `record(key, value)` keeps the values per
    (key, step), one a call. Returns the records and the step kinds."""
    records, step = {}, [0]
    for gm in runtime.programs.values():
        watch(gm, lambda key, value: records.setdefault((*key, step[0]), []).append(value.clone()))
    runtime.reset(steps=steps)
    for step[0] in range(steps):
        call = inputs(2)
        call["hidden_states"] = call["hidden_states"] + step[0]
        call[timestep] = call[timestep] - 10 * step[0]
        runtime.denoise(**call)
    runtime.close()
    return records, [kind.name for kind in runtime.step_log]


def _patch_probe_worker(rank, world):
    """Each attention's fresh K/V (`sp_qkv`) and the K/V it attends to (`sp_attend`), per step."""
    plan = moedit.Plan(patch_parallel={"degree": 2}, expert_parallel={"degree": 2})
    runtime = moedit.compile(tiny_hidream(), plan, example_inputs=hidream_inputs(2), batch_dims=BATCH_DIMS).to_runtime()

    def watch(gm, record):
        for path in ATTENTIONS:
            attn = gm.get_submodule(path)
            attn.sp_qkv.register_forward_hook(lambda _m, _i, out, p=path: record(("fresh", p), out[1]))
            attn.sp_attend.register_forward_hook(lambda _m, inputs, _o, p=path: record(("used", p), inputs[1]))

    records, log = _probe(runtime, watch, hidream_inputs, "timesteps", 4)
    fresh = {key[1:]: value for key, [value] in records.items() if key[0] == "fresh"}
    used = {key[1:]: value for key, [value] in records.items() if key[0] == "used"}
    return fresh, used, log


def test_patch_parallel_on_hidream_reads_other_patches_image_kv_from_the_step_before(spawn):
    """DistriFusion's rule on joint attention: another patch's image K/V at step t is what its rank
    computed at step t-1 (all of step t on synchronous steps), this rank's own image rows and
    every text row (each rank computes them) are step t's."""
    ranks = spawn(2, _patch_probe_worker)
    log = ranks[0][2]
    assert log == ["sync", "async", "async", "async"]
    image, piece, differs = 16, 8, 0
    for rank, (fresh, used, _) in enumerate(ranks):
        assert len(used) == len(ATTENTIONS) * 4
        for (path, t), kv in used.items():
            torch.testing.assert_close(kv[..., image:, :], fresh[path, t][..., piece:, :], rtol=0, atol=0)
            for patch in range(2):
                source = t if log[t] == "sync" or patch == rank else t - 1
                expected = ranks[patch][0][path, source][..., :piece, :]
                torch.testing.assert_close(kv[..., patch * piece:(patch + 1) * piece, :], expected, rtol=0, atol=0,
                                           msg=lambda m: f"rank {rank}, {path}, step {t}, patch {patch}: {m}")
                differs += source != t and not torch.equal(expected, ranks[patch][0][path, t][..., :piece, :])
    assert differs > 0, "stale K/V must differ from this step's, or the probe proves nothing"


PIPEFUSION = moedit.Plan(pipefusion={"degree": 2, "patches": 2, "warmup_steps": 1})


def _pipefusion_probe_worker(rank, world, model_name):
    """Under PipeFusion (2 stages, 2 patches): HiDream's attentions' fresh K/V and the K/V they
    attend to; NucleusMoE's router scores and the scores its expert choice is made over; per call."""
    build, inputs, batch_dims, _ = MODELS[model_name]
    runtime = moedit.compile(build(), PIPEFUSION, example_inputs=inputs(2), batch_dims=batch_dims).to_runtime()

    def watch(gm, record):
        modules = dict(gm.named_modules())
        for path in ATTENTIONS if model_name == "hidream" else ():
            if path in modules:  # this rank's stage
                modules[path].sp_qkv.register_forward_hook(lambda _m, _i, out, p=path: record(("fresh", p), out[1]))
                modules[path].sp_attend.register_forward_hook(lambda _m, i, _o, p=path: record(("used", p), i[1]))
        for path in [f"transformer_blocks.{n}.img_mlp" for n in range(3)] if model_name == "nucleus" else ():
            if path in modules:
                modules[path].ep_scores.register_forward_hook(
                    lambda _m, _i, out, p=path: record(("fresh", p), out.unflatten(0, (2, -1))))  # [B, n, E]
                modules[path].ep_choice.register_forward_hook(lambda _m, i, _o, p=path: record(("used", p), i[0]))

    records, log = _probe(runtime, watch, inputs, "timesteps" if model_name == "hidream" else "timestep", 4)
    return records, log


def _pipefusion_rule(used, fresh, log, image: int, dim: int) -> int:
    """PipeFusion's rule for what patch p reads of patch q at a stale step t: q <= p this step's
    (written earlier in the step), q > p the step before's. `fresh[key, t]`: a tensor per patch
    (one on synchronous steps) with the patch's image rows first along `dim`; `used[key, t]`: the
    buffers read, one per patch. Returns how many stale pieces differ from this step's."""
    differs = 0
    for (key, t), calls in used.items():
        if log[t] == "sync":
            assert len(calls) == 1
            assert torch.equal(calls[0].narrow(dim, 0, image), fresh[key, t][0].narrow(dim, 0, image))
            continue
        patches = len(calls)
        piece = image // patches
        for p, over in enumerate(calls):
            for q in range(patches):
                if q <= p:
                    want = fresh[key, t][q].narrow(dim, 0, piece)
                elif log[t - 1] == "sync":
                    want = fresh[key, t - 1][0].narrow(dim, q * piece, piece)
                else:
                    want = fresh[key, t - 1][q].narrow(dim, 0, piece)
                torch.testing.assert_close(over.narrow(dim, q * piece, piece), want, rtol=0, atol=0,
                                           msg=lambda m: f"{key}, step {t}, patch {p} reading patch {q}: {m}")
                differs += q > p and not torch.equal(want, fresh[key, t][q].narrow(dim, 0, piece))
    return differs


@pytest.mark.parametrize("model_name", ["hidream", "nucleus"])
def test_pipefusion_reads_earlier_patches_of_this_step_and_later_ones_of_the_step_before(spawn, model_name):
    """PipeFusion on the real models: HiDream's joint attention reads the image K/V by the rule
    above, and its text rows' K/V are always the patch's own (the text travels with every
    patch); NucleusMoE's expert choice chooses over router scores kept by the same rule."""
    ranks = spawn(2, _pipefusion_probe_worker, model_name)
    log = ranks[0][1]
    assert log == ["sync", "async", "async", "async"]
    records = {**ranks[0][0], **ranks[1][0]}  # each stage's layers, on its rank
    fresh = {key[1:]: value for key, value in records.items() if key[0] == "fresh"}
    used = {key[1:]: value for key, value in records.items() if key[0] == "used"}
    assert {path for path, _ in used} == set(ATTENTIONS if model_name == "hidream" else
                                              [f"transformer_blocks.{n}.img_mlp" for n in range(3)])
    image = {"hidream": 16, "nucleus": 24}[model_name]  # the image's tokens
    differs = _pipefusion_rule(used, fresh, log, image, -2 if model_name == "hidream" else 1)
    assert differs > 0, "stale pieces must differ from this step's, or the probe proves nothing"
    if model_name == "hidream":  # keys: [image, text]
        for (path, t), calls in used.items():
            for p, kv in enumerate(calls):
                own = fresh[path, t][p]
                torch.testing.assert_close(kv[..., image:, :], own[..., own.shape[-2] - kv.shape[-2] + image:, :],
                                           rtol=0, atol=0)


def test_pipefusion_explains_what_the_text_rows_and_expert_choice_cost():
    explained = moedit.compile(tiny_hidream(), PIPEFUSION, example_inputs=hidream_inputs(2),
                               batch_dims=BATCH_DIMS).explain()
    assert "joint attention: every patch carries all the text rows" in explained
    explained = moedit.compile(tiny_nucleus(), PIPEFUSION, example_inputs=nucleus_inputs(2)).explain()
    assert "expert choice over whole images: 2 layer(s) on rank 0 keep their router scores" in explained


def test_a_dense_model_refuses_expert_plans():
    with pytest.raises(moedit.PlanError, match="expert_parallel.degree, staleness.mode: the model has no MoE layer"):
        moedit.compile(tiny_flux(), moedit.Plan(expert_parallel={"degree": 2}, staleness={"mode": "displaced"}),
                       example_inputs=flux_inputs(2), batch_dims=FLUX_BATCH_DIMS)


def _choice_probe_worker(rank, world):
    """Every expert-choice layer's router scores on this rank (`ep_scores`) and the scores its
    choice is made over (`ep_choice`), per step, under stale patch parallelism."""
    plan = moedit.Plan(patch_parallel={"degree": 2}, expert_parallel={"degree": 2})
    runtime = moedit.compile(tiny_nucleus(), plan, example_inputs=nucleus_inputs(2)).to_runtime()

    def watch(gm, record):
        for layer in range(3):
            moe = gm.get_submodule(f"transformer_blocks.{layer}.img_mlp")
            moe.ep_scores.register_forward_hook(lambda _m, _i, out, n=layer: record(("scores", n), out))
            moe.ep_choice.register_forward_hook(lambda _m, inputs, _o, n=layer: record(("chosen", n), inputs[0]))

    records, log = _probe(runtime, watch, nucleus_inputs, "timestep", 3)
    scores = {key[1:]: value for key, [value] in records.items() if key[0] == "scores"}
    chosen = {key[1:]: value for key, [value] in records.items() if key[0] == "chosen"}
    return scores, chosen, log


def test_expert_choice_under_stale_patches_chooses_from_this_steps_scores(spawn):
    """The rule for scores under stale patch parallelism: unlike other patches' K/V (a step old),
    the scores an expert choice is made over are every patch's of this step."""
    ranks = spawn(2, _choice_probe_worker)
    assert ranks[0][2] == ["sync", "async", "async"]
    for _, chosen, _ in ranks:
        for (layer, t), over in chosen.items():
            pieces = [scores[layer, t].unflatten(0, (2, -1)) for scores, _, _ in ranks]  # [B, n, E] a rank
            torch.testing.assert_close(over, torch.cat(pieces, 1), rtol=0, atol=0)


@pytest.mark.parametrize("plan_name", ["sync ep 2", "ulysses 2"])
def test_the_simulator_replays_expert_choice_at_its_capacity(plan_name):
    """Each expert takes capacity rows of every image (12 of 24 tokens here) in a replay too, so
    EP 2 sends half of them to the rank holding the other half of the experts."""
    from moedit.planner.costs import Hardware
    from moedit.planner.simulate import replay, simulate

    plan = moedit.Plan(expert_parallel={"degree": 2}, **PLANS.get(plan_name, (2, {}))[1])
    compiled = moedit.compile(tiny_nucleus(), plan, example_inputs=nucleus_inputs(4))
    predicted = simulate(replay(compiled, 4), Hardware.load("l40-pcie-8"), steps=2)
    images, experts, capacity, hidden, layers = 4 // 2, 4, 12, 32, 3
    if plan_name == "sync ep 2":
        rows = images * (experts // 2) * capacity  # to the other rank, each way
        counts = (experts // 2) * 8
        assert predicted.sent_bytes[0] == layers * (2 * rows * hidden * 4 + counts) + 4  # + the finite check
    assert all(s > 0 for s in predicted.step_s)
