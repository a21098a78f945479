"""`moedit calibrate`: measure this machine for the cost model and write the `cpu-local`
profile (and, with `--link shaped`, `shaped-link`) to the cache folder.

    compute      float32 (and bfloat16) matmul rate, one thread, median over small to mid shapes
    memory       bandwidth of a large elementwise add, one thread
    per element  softmax over a few experts, top-k, gathers: what the roofline misjudges
    per op       a tiny DiT-MoE compiled by moedit and run on one rank: its time / its ops
                 (dispatcher, Python, module calls)
    efficiency   a small DiT-MoE compiled and run the same way: the share of the roofline
                 (with the per-op time) its ops reach
    sharing      how much slower that model's forward runs when 1, 2 or 4 ranks share the
                 cores, each with cores / ranks threads as the launcher gives them
    link         gloo all-to-alls between 2 and 4 ranks on loopback (`moedit.runtime.probe`);
                 with `--link shaped`, between two network namespaces joined by a shaped
                 veth pair (`moedit.runtime.netns`): its sustained rate, and from bursts
                 after a quiet spell the size of its token bucket
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from moedit.adapters import MoEAdapter, register_adapter
from moedit.planner.costs import ELEMENTS, Hardware, Link, OpCounter, cache_dir
from moedit.runtime.netns import free_port


def _best_of(fn, repeats: int = 5, number: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


MATMULS = ((640, 64, 256), (2560, 64, 64), (1024, 96, 384), (2048, 256, 1024), (512, 512, 512))


def matmul_rate(dtype: torch.dtype) -> float:
    """Median rate over matmul shapes from small to mid-sized transformer layers."""
    rates = []
    for m, k, n in MATMULS:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        rates.append(2 * m * k * n / _best_of(lambda: a @ b))
    return statistics.median(rates)


def memory_rate(numel: int = 1 << 23) -> float:
    a, b, c = torch.ones(numel), torch.ones(numel), torch.empty(numel)
    return 3 * 4 * numel / _best_of(lambda: torch.add(a, b, out=c))


def per_element() -> dict[str, float]:
    """Seconds per element of the op families the roofline misjudges, on a router's shapes."""
    scores, rows = torch.randn(32768, 8), torch.randn(8192, 64)
    index = torch.randint(0, 8192, (16384,))
    found = {}
    for family, fn in (("softmax", lambda: scores.softmax(-1)), ("sort", lambda: scores.topk(2, dim=-1)),
                       ("index", lambda: rows[index])):
        counter = OpCounter()
        with counter:
            fn()
        elements = counter.take()[:, ELEMENTS].sum()
        found[family] = _best_of(fn) / elements
    return found


class ReferenceMoE(torch.nn.Module):
    """Top-2 routed experts plus a shared expert, written plainly (its adapter is below)."""

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(_mlp(hidden) for _ in range(experts))
        self.shared = _mlp(hidden)

    def route(self, tokens):
        weights, ids = self.gate(tokens).softmax(-1).topk(2, dim=-1)
        return ids, weights

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        ids, weights = self.route(tokens)
        out = self.shared(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(ids == e, as_tuple=True)
            out = out.index_add(0, rows, expert(tokens[rows]) * weights[rows, slot].unsqueeze(-1))
        return out.reshape(x.shape)


def _mlp(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                               torch.nn.Linear(2 * hidden, hidden))


class _ReferenceAdapter(MoEAdapter):
    def route(self, moe, tokens):
        return moe.route(tokens)

    def experts(self, moe):
        return list(moe.experts)

    def shared_expert(self, moe):
        return moe.shared

    def top_k(self, moe):
        return 2


register_adapter(ReferenceMoE, _ReferenceAdapter())


class ReferenceDiT(torch.nn.Module):
    """The calibration's workload: DiT-MoE blocks (adaLN modulation, attention, routed and
    shared experts) at sizes of its own, compiled and run by moedit like any model."""

    def __init__(self, hidden: int = 96, heads: int = 4, experts: int = 8, depth: int = 2, tokens: int = 64):
        super().__init__()
        self.hidden, self.heads, self.tokens = hidden, heads, tokens
        self.embed = torch.nn.Linear(hidden, hidden)
        self.modulation = torch.nn.ModuleList(torch.nn.Linear(hidden, 4 * hidden) for _ in range(depth))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(hidden, 3 * hidden) for _ in range(depth))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))
        self.moe = torch.nn.ModuleList(ReferenceMoE(hidden, experts) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)

    def example_inputs(self, batch: int):
        return torch.randn(batch, self.tokens, self.hidden), torch.randn(batch, self.hidden)

    def forward(self, x, c):
        b, n, h = x.shape
        x = self.embed(x)
        for modulation, qkv, proj, moe in zip(self.modulation, self.qkv, self.proj, self.moe):
            shift, scale, gate1, gate2 = modulation(torch.nn.functional.silu(c)).chunk(4, -1)
            y = self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
            q, k, v = qkv(y).reshape(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h)
            x = x + gate1.unsqueeze(1) * proj(y)
            x = x + gate2.unsqueeze(1) * moe(self.norm(x))
        return x


TINY = {"hidden": 8, "heads": 2, "experts": 4, "depth": 2, "tokens": 4}  # all overhead
REFERENCE = {"hidden": 96, "heads": 4, "experts": 8, "depth": 2, "tokens": 64}
REFERENCE_BATCH = 16


def _program_worker() -> None:
    """In a fresh process (a one-rank process group of its own): time moedit's compiled
    program of the tiny and the reference model, and print their ops, as JSON."""
    import moedit
    from moedit.planner.simulate import replay

    torch.set_num_threads(int(sys.argv[2]))
    found = {}
    for label, size, batch in (("tiny", TINY, 1), ("reference", REFERENCE, REFERENCE_BATCH)):
        torch.manual_seed(0)
        compiled = moedit.compile(ReferenceDiT(**size).eval(), moedit.Plan(expert_parallel={"degree": 1}))
        inputs = compiled.model.example_inputs(batch)
        with compiled.to_runtime() as runtime:
            seconds = _best_of(lambda: runtime.denoise(*inputs), repeats=5, number=5)
        events = replay(compiled, batch).events[0][next(iter(compiled.kinds))]
        found[label] = {"seconds": seconds, "ops": [e.ops.tolist() for e in events if hasattr(e, "ops")]}
    print(json.dumps(found), flush=True)


def run_programs(threads: int = 1) -> dict:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "moedit.planner.calibrate", "--program-worker", str(threads)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the calibration program failed:\n{proc.stderr[-3000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {label: (v["seconds"], np.concatenate([np.array(o).reshape(-1, 4) for o in v["ops"]]))
            for label, v in found.items()}


def _sharing_worker() -> None:
    torch.set_num_threads(int(sys.argv[2]))
    torch.manual_seed(0)
    model = ReferenceDiT(**REFERENCE).eval()
    inputs = model.example_inputs(REFERENCE_BATCH)
    with torch.no_grad():
        print(_best_of(lambda: model(*inputs), number=5), flush=True)


def sharing(ranks: int, threads: int | None = None) -> float:
    """Time of the reference model's forward with `ranks` processes at once, each with the
    threads the launcher would give it (divide by `sharing` of one process, one thread)."""
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    command = [sys.executable, "-m", "moedit.planner.calibrate", "--sharing-worker", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(ranks)]
    times = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return max(times)


def probe(world: int, size: int, burst: int | None = None, link=None) -> dict:
    """Run `moedit.runtime.probe` on `world` ranks over loopback, or over `link` (a ShapedLink,
    half the ranks in each namespace)."""
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    args = ["-m", "moedit.runtime.probe", str(size), str(burst or size)]
    if link is None:
        commands = [(launcher + ["--standalone", f"--nproc_per_node={world}", *args], dict(os.environ))]
    else:
        port = str(free_port())
        commands = [(link.exec(i, launcher + ["--nnodes=2", f"--node_rank={i}", f"--nproc_per_node={world // 2}",
                                              f"--master_addr={link.addresses[0]}", f"--master_port={port}", *args]),
                     {**os.environ, **link.env(i)}) for i in range(2)]
    env_threads = {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env={**env, **env_threads}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd, env in commands]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        if proc.returncode:
            raise RuntimeError(f"the link probe failed:\n{err[-2000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def loopback_link(worlds=(2, 4), size: int = 1 << 20) -> tuple[Link, list[dict]]:
    """Per-peer latency and per-rank bandwidth of gloo on loopback, fitted over `worlds`."""
    found = [probe(world, size) for world in worlds if world <= max(2, 2 * (os.cpu_count() or 1))]
    latency = min(p["latency_s"] / (p["world"] - 1) for p in found)
    rate = min(p["bytes_per_s"] for p in found)
    # only ranks that outnumber the cores take turns
    # (2-CPU VM, 4 ranks: 2.5 ms more after 6.6 ms of compute, 7.8 after 65: the square root's growth)
    turns = {p["world"]: statistics.fmean(max(0.0, p[loaded] - p["latency_s"]) / math.sqrt(p[computed])
                                          for loaded, computed in (("loaded_latency_s", "computed_between_s"),
                                                                   ("long_loaded_latency_s", "computed_long_s")))
             for p in found if p["world"] > (os.cpu_count() or 1)}
    # TCP on loopback is CPU-bound: a second of it is a core's second, moving `rate` each way
    return Link(latency_s=latency, latency_by_world={p["world"]: p["latency_s"] for p in found}, turn_taking_s=turns,
                bytes_per_s=rate, issue_s=statistics.median(p["issue_s"] for p in found),
                cpu_bytes_per_s=2 * rate), found


def shaped_link(link, cpu_bytes_per_s: float, size: int = 256 * 1024,
                bursts: tuple[int, ...] = (128 << 10, 192 << 10, 256 << 10, 512 << 10)) -> tuple[Link, list[dict]]:
    """The shaped link between the two namespaces: its sustained rate (a stream of
    all-to-alls), and its token bucket: the most that a burst after a short quiet spell
    moves beyond what the sustained rate would have moved in its time."""
    found = [probe(2, size, burst, link=link) for burst in bursts]
    rate = statistics.median(p["bytes_per_s"] for p in found)
    beyond = [(p["burst"] - (p["isolated_s"] - p["latency_s"]) * rate, p) for p in found]
    bucket, best = max(beyond, key=lambda b: b[0])
    return Link(latency_s=statistics.median(p["latency_s"] for p in found), bytes_per_s=rate,
                issue_s=statistics.median(p["issue_s"] for p in found), bucket_bytes=max(0.0, bucket),
                cpu_bytes_per_s=cpu_bytes_per_s), found


def calibrate(link: str = "loopback", verbose: bool = True, nodes: int | None = None,
              ranks_per_node: int = 2) -> Hardware:
    """Measure this machine; write and return `cpu-local` (or `shaped-link`; with `nodes` 2, also
    `shaped-2xR`: the two-node test bed, `ranks_per_node` ranks in each namespace)."""
    bar = tqdm(total=5 + (link == "shaped"), desc="calibrate", unit="phase", disable=not verbose, leave=False)

    def say(line: str) -> None:
        if verbose:
            tqdm.write(line)

    def phase(name: str) -> None:
        bar.update()
        bar.set_postfix_str(name)

    torch.set_num_threads(1)
    flops = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    phase("memory")
    memory, elements = memory_rate(), per_element()
    phase("programs")
    programs = run_programs()
    phase("ranks sharing the cores")
    tiny_s, tiny_ops = programs["tiny"]
    overhead = tiny_s / len(tiny_ops)  # the tiny model's ops are all overhead
    roofline = Hardware(name="roofline", source="", flops_per_s=flops, memory_bytes_per_s=memory,
                        op_overhead_s=overhead, per_element_s=elements, intra=Link(latency_s=0, bytes_per_s=1))
    reference_s, reference_ops = programs["reference"]
    efficiency = roofline.seconds(reference_ops, "float32") / reference_s
    say(f"compute: {flops['float32'] / 1e9:.1f} GFLOP/s float32, {flops['bfloat16'] / 1e9:.1f} bfloat16 (one "
        f"thread); memory {memory / 1e9:.1f} GB/s; {overhead * 1e6:.1f} us per op in a moedit program; ns per "
        "element: " + ", ".join(f"{k} {v * 1e9:.2f}" for k, v in elements.items()))
    say(f"a reference DiT-MoE compiled by moedit, one rank: {reference_s * 1e3:.2f} ms a step measured; its ops "
        f"reach {efficiency:.0%} of the roofline")
    alone = sharing(1, threads=1)
    slowdown = {ranks: sharing(ranks) / alone for ranks in sorted({1, 2, 4, 2 * ranks_per_node if nodes else 1})}
    say("ranks sharing the cores -> compute time x " + ", ".join(f"{r}: {s:.2f}" for r, s in slowdown.items()))
    phase("loopback link")
    intra, found = loopback_link()
    phase("shaped link" if link == "shaped" else "done")
    for p in found:
        say(f"loopback, {p['world']} ranks: {p['latency_s'] * 1e3:.2f} ms per small all-to-all "
            f"({p['loaded_latency_s'] * 1e3:.2f} ms between computing ranks), "
            f"{p['bytes_per_s'] / 1e9:.2f} GB/s per rank")
    machine = f"{platform.node()}: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, gloo"
    profile = Hardware(name="cpu-local", source=f"measured by `moedit calibrate` on {machine}, "
                       f"{time.strftime('%Y-%m-%d')}", flops_per_s=flops, memory_bytes_per_s=memory,
                       op_overhead_s=overhead, per_element_s=elements, efficiency=efficiency,
                       ranks_per_node=1 << 16, intra=intra, compute_slowdown=slowdown,
                       memory_bytes=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), memory_shared=True)
    profile.save(cache_dir() / "cpu-local.yaml")
    say(f"wrote {cache_dir() / 'cpu-local.yaml'}")
    if link == "shaped":
        from moedit.runtime.netns import ShapedLink

        with ShapedLink() as shaped:
            inter, found = shaped_link(shaped, intra.cpu_bytes_per_s)
            say(f"shaped link ({shaped.describe()}): {inter.bytes_per_s / 1e6:.1f} MB/s sustained, "
                f"{inter.latency_s * 1e3:.2f} ms per small all-to-all, bucket {inter.bucket_bytes / 1024:.0f} KiB")
        profile = profile.model_copy(update={"name": "shaped-link", "nodes": 2, "inter": inter,
                                             "source": profile.source + f"; link: {shaped.describe()}"})
        profile.save(cache_dir() / "shaped-link.yaml")
        say(f"wrote {cache_dir() / 'shaped-link.yaml'}")
        if nodes:  # the same links; the node boundary after every `ranks_per_node` ranks, as torchrun numbers them
            name = f"shaped-{nodes}x{ranks_per_node}"
            bed = profile.model_copy(update={"name": name, "nodes": None, "ranks_per_node": ranks_per_node,
                                             "source": profile.source + f"; {nodes} nodes (namespaces) of "
                                             f"{ranks_per_node} ranks, loopback inside a node"})
            bed.save(cache_dir() / f"{name}.yaml")
            say(f"wrote {cache_dir() / f'{name}.yaml'}")
        phase("done")
    bar.close()
    return profile


if __name__ == "__main__":
    {"--sharing-worker": _sharing_worker, "--program-worker": _program_worker}[sys.argv[1]]()
