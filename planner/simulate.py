"""The simulator: predict a plan's step time, exposed communication and peak memory on a
hardware profile, for any world size, by replaying every rank's programs.

Two stages, so that one replay serves every hardware profile:

1. `replay(compiled, batch)`: run each rank's program for every step kind on fake tensors
   (nothing is computed) and record what it does, in program order, as events:

       Compute(region, ops)     ops: [n, 2] FLOPs and bytes of the torch ops it ran
       Start(exchange, sent)    sent[q]: bytes to rank q
       Wait(exchange, local)    local: started earlier in the same program; else carried
                                over from an earlier step (stale layers)

   Routing is data-dependent, so the router's choices are replaced by a uniform one (token
   i's slots go to experts i*K, i*K+1, ... modulo E): every expert gets the same number of
   rows, as a trained router's load balancing aims for. An expert choice (each expert takes
   its top tokens of an image) chooses on random inputs, so each expert still takes its
   share of every image. The rest is the program as compiled and scheduled, with its own shapes.

2. `simulate(replayed, hardware, steps)`: a discrete-event run of all ranks over a sample's
   steps (each step runs its kind's events, as the executor would): a rank's compute lane
   runs its events one after another; an exchange starts once every rank has issued it and
   the previous exchange on its communicator has finished, and moves its bytes over the
   axis's links one exchange at a time (first come, first served; token buckets keep their
   level over time); a wait blocks its rank until the exchange has landed. A carried wait
   waits for the latest exchange of that name started in an earlier step (after a
   synchronous step there is none, and it costs nothing, as in the runtime).

The result carries per-rank `Span`s in the runtime's timeline format, so
`moedit.runtime.timeline.draw` renders predicted and measured timelines alike.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import statistics
from collections import defaultdict

import numpy as np
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

from moedit.planner.costs import Hardware, OpCounter
from moedit.passes.schedule import peak_bytes_of
from moedit.runtime import expert_ops, ops
from moedit.runtime.cache import StepCache
from moedit.runtime.comm import MAIN, Exchange, Pending
from moedit.runtime.executor import BATCH_AXIS
from moedit.runtime.regions import region
from moedit.runtime.timeline import COMPUTE, Span, exchange_name, lane_of
from moedit.runtime.wire import wire_of
from moedit.steps import StepKind


class SimulationError(RuntimeError):
    pass


# -- 1. replay -------------------------------------------------------------------------

@dataclasses.dataclass
class Compute:
    region: str
    ops: np.ndarray
    dtype: str


@dataclasses.dataclass
class Start:
    exchange: Exchange
    sent: list[float]  # bytes to each rank
    group: tuple[int, ...] = ()  # the ranks that take part (the mesh group of its axis); () every rank


@dataclasses.dataclass
class Wait:
    exchange: Exchange
    region: str
    start: int | None  # index of the Start event in the same program, or None: carried


@dataclasses.dataclass
class Replayed:
    """Every rank's events per step kind, with what memory it holds."""

    world: int
    steps: object  # the compiled model's StepPlan
    events: list[dict[StepKind, list]]  # [rank][kind]
    weight_bytes: list[int]
    activation_bytes: list[int]  # peak of live activations over the rank's programs
    cache_bytes: list[int]  # staleness caches
    tokens_per_rank: int


class _Work:
    """Stands in for a collective's work handle in a replay."""

    def __init__(self, program: object, index: int):
        self.program, self.index = program, index


class _SimRun:
    """The `run` input of a replayed program: a real step cache; exchanges are recorded."""

    def __init__(self, rank: int, world: int, layout):
        self.rank, self.world, self.layout = rank, world, layout
        self.cache = StepCache()
        self.step, self.seed, self.kind, self.sent_bytes, self.timeline = 1, 0, None, 0, None
        self.events: list = []
        self.program: object = None  # identifies the replay under way (local or carried waits)
        self.region = "dense"  # the region being replayed, for the waits it records
        self.flush = lambda: None  # the replay's: close the open Compute event before a Wait

    def issued(self, pending):
        return pending

    @property
    def experts(self) -> "_ResidentExperts":
        return _ResidentExperts()

    def wait(self, pending: Pending):
        if pending.work is None:
            return pending.output
        self.flush()
        local = pending.work.program is self.program
        self.events.append(Wait(pending.exchange, self.region, pending.work.index if local else None))
        return pending.output


class _ResidentExperts:
    """Offloading in a replay: the experts run as they are; the copies are not modelled
    (on a GPU they run on the copy engine, beside compute and the network)."""

    def fetch(self, layer: int, needed: list[int]) -> None:
        return None


def _random(value):
    """Real random tensors (the same each call) in place of fake ones, for an expert choice."""
    generator = torch.Generator().manual_seed(0)
    return tree_map(lambda t: torch.rand(t.shape, generator=generator).to(t.dtype) if isinstance(t, FakeTensor)
                    else _concrete(t), value)


def _concrete(value):
    """Real 0-dim integer tensors (a captured model's shape constants: a slice's bound, a
    reshape's size) as Python ints, so that the fake tensors' op needs no data."""
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and value.dim() == 0 \
            and value.dtype in (torch.int32, torch.int64):
        return int(value)
    if isinstance(value, slice):
        return slice(*map(_concrete, (value.start, value.stop, value.step)))
    if type(value) in (tuple, list):
        return type(value)(map(_concrete, value))
    if type(value) is dict:
        return {key: _concrete(item) for key, item in value.items()}
    return value


class _Replay(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, run: _SimRun, fake: FakeTensorMode, counter: OpCounter):
        super().__init__(gm)
        self.run_state, self.fake, self.counter = run, fake, counter
        run.flush = self.flush
        self.sizes: dict[fx.Node, int] = {}
        self._region = None

    def run_node(self, node: fx.Node):
        self._region = region(node) or self._region or "dense"
        self.run_state.region = self._region
        out = super().run_node(node)
        self.flush()
        self.sizes[node] = sum(_nbytes(t) for t in tree_flatten(out)[0])
        return out

    def flush(self) -> None:
        """The ops counted so far become (part of) a Compute event of the current region."""
        done, events = self.counter.take(), self.run_state.events
        if not len(done):
            return
        last = events[-1] if events else None
        if isinstance(last, Compute) and last.region == self._region:
            last.ops = np.concatenate([last.ops, done])
        else:
            events.append(Compute(self._region, done, _dtype(self.counter.dtype)))

    def _run(self, fn, args, kwargs):
        if any(isinstance(t, FakeTensor) for t in tree_flatten((args, kwargs))[0]):
            args, kwargs = _concrete(args), _concrete(kwargs)
            with self.fake, self.counter:
                return fn(*args, **kwargs)
        with self.counter:
            return fn(*args, **kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, expert_ops.Choice) or (type(module) is expert_ops.Router and module.adapter.empty_slots):
            self._run(module, args, kwargs)  # counted; then each expert picks its tokens of random inputs
            return module(*_random(args), **_random(kwargs))
        if type(module) is expert_ops.Router:
            ids, weights = self._run(module, args, kwargs)
            tokens, top_k = ids.shape
            experts = len(module.adapter.experts(module._moe))
            uniform = (torch.arange(tokens * top_k) % experts).reshape(tokens, top_k)
            return uniform, weights
        if isinstance(module, expert_ops.DropSlots):
            run, ids, _ = args
            if module.policy == "threshold":  # scores are not known: assume every slot passes
                return torch.ones(ids.shape, dtype=torch.bool)
            with self.counter:
                return module.reference(run, ids, torch.zeros(ids.shape))
        if isinstance(module, expert_ops.LocalExperts):
            received, recv_counts = args[:2]  # (offloading adds the fetch: the copies are not modelled)
            sizes = recv_counts.reshape(-1, len(module._experts)).sum(0).tolist()
            with self.fake, self.counter:
                for expert, rows in zip(module._experts, sizes):
                    expert(received.new_empty((rows, received.shape[-1])))
                out = torch.empty_like(received)
            rows = received.shape[0]
            self.counter.add(16 * rows, rows, "sort", count=2)  # which expert each row is for
            self.counter.add(4 * _nbytes(received), received.numel(), "index", count=2)  # group by expert and back
            return out
        return self._run(module, args, kwargs)

    def call_function(self, target, args, kwargs):
        run = self.run_state
        if target in (expert_ops.permute, expert_ops.unpermute):  # costed as the torch code (same traffic)
            kwargs = {key: value for key, value in kwargs.items() if key != "kernels"}
        if target is expert_ops.permute:
            tokens, expert_ids, *rest = args
            _, order, send_counts = expert_ops.permute(torch.zeros(expert_ids.shape[0], 1), expert_ids, *rest,
                                                      **kwargs)
            with self.fake:
                rows = tokens.new_empty((order.numel(), tokens.shape[-1]))
            self.counter.add(6 * 8 * order.numel(), order.numel(), "sort", count=3)  # key, argsort, bincount
            self.counter.add(2 * _nbytes(rows), rows.numel(), "index")  # gather the rows
            return rows, order, send_counts
        if target not in ops.EXCHANGE_STARTS:
            return self._run(target, args, kwargs)
        exchange = Exchange(kwargs.get("name", "counts"), kwargs["layer"], kwargs["axis"], kwargs.get("channel", MAIN))
        group = run.layout.group_of(exchange.axis, run.rank)
        me, size = group.index(run.rank), len(group)
        if target in (ops.send_start, ops.recv_start):  # a pair: sender and receiver issue one exchange
            peer = group[kwargs["peer"]]
            group = sorted((run.rank, peer))
            exchange = Exchange(f"activations, tag {kwargs['tag']}", None, exchange.axis, exchange.channel)
            out = args[1]
            sent = [_nbytes(out) if target is ops.send_start and q == peer else 0 for q in group]
        elif target is ops.broadcast_start:
            out = args[1]
            sent = [_nbytes(out) if me == kwargs["root"] else 0] * size
        elif target is ops.counts_start:
            send_counts = args[1]
            recv = send_counts[me:me + 1].expand_as(send_counts).clone()  # all ranks route alike
            out, sent = recv, [send_counts[0].numel() * send_counts.element_size()] * size
        elif target is ops.exchange_start:
            _, rows, send_splits, recv_splits = args
            with self.fake:
                out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
            wire = wire_of(kwargs.get("wire"), kwargs.get("wire_block", 128))
            width = math.prod(rows.shape[1:])
            row = width * rows.element_size() if wire is None else wire.row_bytes(width)
            sent = [row * n for n in send_splits]
            self.counter.add(_nbytes(rows) + row * rows.shape[0])  # the copy (or the cast) into the send buffer
            if wire is not None:  # and the cast back at the wait
                self.counter.add(row * sum(recv_splits) + width * rows.element_size() * sum(recv_splits))
        elif target is ops.gather_start:
            piece = args[1]
            with self.fake:
                out = piece.new_empty((size, *piece.shape))
            sent = [_nbytes(piece)] * size
            self.counter.add(2 * _nbytes(piece))
        else:  # ring_start: to the next rank of the ring only
            block = args[1]
            with self.fake:
                out = torch.empty_like(block)
            sent = [_nbytes(block) if q == (me + 1) % size else 0 for q in range(size)]
            self.counter.add(2 * _nbytes(block))
        self.flush()
        to_rank = [0.0] * run.world
        for q, b in zip(group, sent):
            to_rank[q] = 0.0 if q == run.rank else b
        run.events.append(Start(exchange, to_rank, tuple(group)))
        return Pending(out, _Work(run.program, len(run.events) - 1), exchange)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def replay(compiled, batch: int, ranks: list[int] | None = None) -> Replayed:
    """Replay every rank's programs on fake inputs for a global batch of `batch` sequences (with
    CFG: twice the images), or only `ranks`' with the others taken to mirror rank 0. That holds for
    expert parallelism, with or without data-parallel replicas, when every rank gets as many
    sequences; other plans (cfg, patch, sequence or pipeline parallel) replay every rank whatever
    `ranks` says."""
    world, layout = compiled.world_size, compiled.plan.mesh
    shards = [len(s) for s in torch.arange(batch).tensor_split(layout.data)]
    if compiled.signature is not None:  # a rank without a sample runs a copy of one (Runtime.denoise)
        shards = [max(1, shard) for shard in shards]
    if min(shards) == 0:
        raise SimulationError(f"a global batch of {batch} leaves a data shard of {layout.data} with nothing to do")
    model = compiled.model
    if compiled.signature is None and not hasattr(model, "example_inputs"):
        raise SimulationError(f"{type(model).__name__} has no example_inputs(batch): the simulator needs "
                              "the shapes of the model's inputs; compile it with example_inputs=")
    # only expert (and data) parallel ranks with equal shards mirror rank 0
    if ranks is None or layout.data != world or len(set(shards)) > 1:
        ranks = list(range(world))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    counter = OpCounter()
    events, weights, activations, caches = [], [], [], []
    dtype = next(model.parameters()).dtype
    for rank in ranks:
        shard = shards[layout.index("data", rank)]
        if compiled.signature is None:
            with fake:
                inputs = [t.to(dtype) if t.is_floating_point() else t for t in model.example_inputs(shard)]
            programs = compiled.programs(rank)
        else:
            captured, tensors = _captured_for(compiled, shard)
            inputs = [fake.from_tensor(t) for t in tensors]
            programs = captured.programs(rank)
        run = _SimRun(rank, world, layout)
        order = [StepKind(True)] + [k for k in compiled.kinds if not k.synchronous]
        order += [k for k in compiled.kinds if k not in order]
        per_kind, peak = {}, 0
        for kind in order:
            for attempt in range(2 if kind in per_kind or not kind.synchronous else 1):
                run.events, run.program, run.kind = [], object(), kind
                interpreter = _Replay(programs[kind], run, fake, counter)
                with torch.no_grad():
                    interpreter.run(*inputs, run)
            per_kind[kind] = run.events
            peak = max(peak, peak_bytes_of(list(programs[kind].graph.nodes), interpreter.sizes))
        events.append(per_kind)
        weights.append(sum(p.numel() * p.element_size() for p in _parameters(programs)))
        activations.append(peak)
        caches.append(run.cache.nbytes())
    if len(ranks) < world:  # mirror rank 0 (uniform routing: every rank does the same)
        events += [_mirror(events[0], r, world, layout.ep) for r in range(len(ranks), world)]
        for values in (weights, activations, caches):
            values += [values[0]] * (world - len(ranks))
    return Replayed(world, compiled.steps, events, weights, activations, caches, shards[0])


def _captured_for(compiled, shard: int):
    """A captured model's programs for a call of `shard` samples (the captured call's shapes with
    that batch, as Runtime.denoise cuts it), and the call's tensors (zeros: a capture depends on
    shapes only)."""
    signature, tensors = compiled.signature, []
    for name, (shape, dtype, _) in zip(signature.names, signature.tensors):
        axis = compiled.batch_dims.get(name, 0)
        if axis is not None and len(shape) > axis:
            shape = (*shape[:axis], shard, *shape[axis + 1:])
        tensors.append(torch.zeros(shape, dtype=dtype))
    return compiled.specialise(signature.with_tensors(tensors), tensors), tensors


def _parameters(programs: dict) -> list:
    """The weights a rank holds: its programs' own, and its experts' (held as views, see
    [Note: layer views], so not registered as submodules)."""
    seen = {}
    for gm in programs.values():
        for module in [gm, *(e for m in gm.modules() for e in getattr(m, "_experts", []))]:
            seen.update((id(p), p) for p in module.parameters())
    return list(seen.values())


def _mirror(per_kind: dict, rank: int, world: int, ep: int) -> dict:
    """Rank 0's events as rank `rank` would record them, the experts sharded over groups of `ep`
    consecutive ranks: rank q of rank 0's view is rank `seen(q)` of `rank`'s (the same place in
    its expert group turned by `rank`'s, and its group moved by as many groups as `rank`'s)."""
    groups = world // ep

    def seen(q: int) -> int:
        return (q // ep + rank // ep) % groups * ep + (q + rank) % ep

    out = {}
    for kind, events in per_kind.items():
        moved = []
        for e in events:
            if isinstance(e, Start):
                sent = [0.0] * world
                for q, b in enumerate(e.sent):
                    sent[seen(q)] = b
                e = dataclasses.replace(e, sent=sent, group=tuple(sorted(map(seen, e.group))))
            moved.append(e)
        out[kind] = moved
    return out


# -- 2. simulate -----------------------------------------------------------------------

@dataclasses.dataclass
class Prediction:
    hardware: str
    world: int
    step_s: list[float]  # per step, the slowest rank's
    blocked_s: list[float]  # per step, rank 0's time waiting for exchanges
    sent_bytes: list[float]  # per step, rank 0's bytes to other ranks
    peak_bytes: int  # the largest rank's weights + live activations + caches
    spans: list[list[Span]]

    @property
    def mean_step_s(self) -> float:
        """Mean step time with the first step left out, as the benchmarks measure it."""
        steps = self.step_s[1:] or self.step_s
        return statistics.fmean(steps)

    @property
    def exposed_comm_s(self) -> float:
        steps = self.blocked_s[1:] or self.blocked_s
        return statistics.fmean(steps)


class _Bucket:
    """A token bucket's level over time (tc tbf): the bytes it lets through at line rate."""

    def __init__(self, link):
        self.link, self.tokens, self.at = link, link.bucket_bytes, 0.0

    def transfer(self, size: float, now: float) -> float:
        link = self.link
        if link.bucket_bytes <= 0:
            return size / link.bytes_per_s
        self.tokens = min(link.bucket_bytes, self.tokens + (now - self.at) * link.bytes_per_s)
        fast = min(size, self.tokens)
        seconds = fast / (link.burst_bytes_per_s or 1e12) + (size - fast) / link.bytes_per_s
        self.tokens -= fast
        self.at = now + seconds
        if size > fast:
            self.tokens = 0.0
        return seconds


class _Fabric:
    """The links of one group of a mesh axis: exchanges move over them one at a time."""

    def __init__(self, hardware: Hardware, world: int, members: tuple[int, ...]):
        self.hw, self.world, self.members = hardware, world, members
        self.node = [hardware.node_of(r, world) for r in range(world)]
        self.buckets = {n: _Bucket(hardware.inter) for n in set(self.node)} if hardware.inter else {}
        self.free = 0.0

    def move(self, sent: list[list[float]], ready: float, computed: float = 0.0) -> tuple[float, float]:
        """(start, landed) of an exchange with sent[r][q] bytes, ready at `ready`, whose ranks
        computed up to `computed` seconds since they last synchronised."""
        # Its latency is that of an all-to-all of the group's size; its turn-taking (CPU ranks that
        # outnumber the cores run in turn) that of every rank sharing the cores, the world on a
        # calibrated machine. (Two-node test bed, 2-rank expert groups among 4 ranks: 41 % fast with
        # the turn-taking of 2 ranks, 10-14 % with that of 4.)
        size = len(self.members)
        start = max(ready, self.free) + self.hw.intra.turns(self.world, computed)
        hw, node = self.hw, self.node
        intra = max(sum(b for q, b in enumerate(row) if node[q] == node[r]) for r, row in enumerate(sent))
        peers = max(sum(1 for q in self.members if node[q] == node[r]) for r in self.members) - 1
        seconds = intra / hw.intra.bytes_per_s
        latency = hw.intra.latency(peers, size)
        if len(self.buckets) > 1:
            out = defaultdict(float)
            for r, row in enumerate(sent):
                for q, b in enumerate(row):
                    if node[q] != node[r]:
                        out[node[r]] += b
            seconds = max([seconds] + [self.buckets[n].transfer(b, start) for n, b in out.items()])
            latency = max(latency, hw.inter.latency(1, size))
        self.free = start + seconds
        return start, start + latency + seconds


@dataclasses.dataclass
class _Instance:
    exchange: Exchange
    group: tuple[int, ...]  # the ranks that take part
    step: int
    issued: dict  # rank -> time
    sent: dict  # rank -> bytes per destination
    landed: float | None = None
    moving: tuple[float, float] = (0.0, 0.0)  # when its bytes moved
    waited: set = dataclasses.field(default_factory=set)
    parked: list = dataclasses.field(default_factory=list)  # (rank, since, region)


def simulate(replayed: Replayed, hardware: Hardware, steps: int = 20, check_finite: bool = True) -> Prediction:
    """Run every rank's events over a `steps`-step sample on `hardware` (see the module's
    docstring). `check_finite` adds the runtime's per-step all-gather of a flag."""
    world = replayed.world
    everyone = tuple(range(world))
    kinds = [replayed.steps.kind_at(s, steps) for s in range(steps)]
    streams = []
    for r in range(world):
        stream = []
        for step, kind in enumerate(kinds):
            offset = len(stream)
            for e in replayed.events[r][kind]:
                if isinstance(e, Wait) and e.start is not None:
                    e = dataclasses.replace(e, start=e.start + offset)
                stream.append((step, e))
            if check_finite:
                flag = Exchange("check for non-finite latents", None, BATCH_AXIS)
                stream.append((step, Start(flag, [0.0 if q == r else 4.0 for q in range(world)], everyone)))
                stream.append((step, Wait(flag, "sampler", len(stream) - 1)))
            stream.append((step, "end"))
        streams.append(stream)
    fabrics: dict = {}  # (axis, group) -> _Fabric
    channel_free: dict = defaultdict(float)
    instances: dict = {}  # (exchange, occurrence) -> _Instance
    occurrence = [defaultdict(int) for _ in range(world)]
    started = [dict() for _ in range(world)]  # stream index -> _Instance
    latest = [defaultdict(list) for _ in range(world)]  # exchange -> instances started, in order
    clock, pos = [0.0] * world, [0] * world
    synced = [0.0] * world  # when each rank last left a wait
    step_end = [[0.0] * steps for _ in range(world)]
    blocked = [[0.0] * steps for _ in range(world)]
    spans: list[list[Span]] = [[] for _ in range(world)]
    sent_total = [0.0] * steps
    cost_cache: dict = {}
    cpu_rate = hardware.intra.cpu_bytes_per_s
    issue_s = hardware.intra.issue_s
    heap = [(0.0, r) for r in range(world)]

    def land(inst: _Instance) -> None:
        ready = max(inst.issued.values())
        sent = [inst.sent.get(r, [0.0] * world) for r in range(world)]
        lane = (inst.exchange.axis, inst.exchange.channel, inst.group)
        computed = max(inst.issued[r] - synced[r] for r in inst.group)
        key = (inst.exchange.axis, inst.group)
        if key not in fabrics:
            fabrics[key] = _Fabric(hardware, world, inst.group)
        start, landed = fabrics[key].move(sent, max(ready, channel_free[lane]), computed)
        channel_free[lane] = inst.landed = landed
        inst.moving = (start, landed)
        for r in inst.group:
            spans[r].append(Span(lane_of(inst.exchange), exchange_name(inst.exchange), inst.issued[r], landed,
                                 inst.step))
        for r, since, where, step in inst.parked:
            arrive(r, inst, since, where, step)
        inst.parked.clear()

    def arrive(r: int, inst: _Instance, since: float, where: str, step: int) -> None:
        """Rank r, at `since`, reaches the wait for `inst`, which has landed: it pays the CPU
        time the transfer took from its compute (CPU-moved links), then waits for the rest."""
        if cpu_rate:
            start, end = inst.moving
            overlap = max(0.0, min(end, since) - max(start, inst.issued[r]))
            moved = sum(inst.sent[r]) + sum(inst.sent[q][r] for q in inst.group)
            since += overlap / max(end - start, 1e-12) * moved / cpu_rate
        end = max(since, inst.landed)
        synced[r] = end
        if end > since:
            spans[r].append(Span(COMPUTE, where, since, end, step))
            blocked[r][step] += end - since
        clock[r] = end
        heapq.heappush(heap, (end, r))

    while heap:
        now, r = heapq.heappop(heap)
        stream = streams[r]
        while pos[r] < len(stream):
            index = pos[r]
            step, e = stream[index]
            pos[r] += 1
            if e == "end":
                step_end[r][step] = clock[r]
                continue
            if isinstance(e, Compute):
                key = id(e.ops)
                if key not in cost_cache:
                    cost_cache[key] = hardware.seconds(e.ops, e.dtype, world)
                seconds = cost_cache[key]
                spans[r].append(Span(COMPUTE, e.region, clock[r], clock[r] + seconds, step))
                clock[r] += seconds
                heapq.heappush(heap, (clock[r], r))
                break
            if isinstance(e, Start):
                group = e.group or everyone
                n = occurrence[r][e.exchange, group]
                occurrence[r][e.exchange, group] += 1
                inst = instances.setdefault((e.exchange, group, n), _Instance(e.exchange, group, step, {}, {}))
                inst.issued[r], inst.sent[r] = clock[r], e.sent
                started[r][index] = inst
                latest[r][e.exchange].append(inst)
                if r == 0:
                    sent_total[step] += sum(e.sent)
                clock[r] += issue_s
                if len(inst.issued) == len(group):
                    land(inst)
                continue
            # a wait
            if e.start is not None:
                inst = started[r][e.start]
            else:
                earlier = [i for i in latest[r][e.exchange] if i.step < step]
                inst = earlier[-1] if earlier and r not in earlier[-1].waited else None
            if inst is None:
                continue
            inst.waited.add(r)
            if inst.landed is None:
                inst.parked.append((r, clock[r], _wait_region(e), step))
            else:
                arrive(r, inst, clock[r], _wait_region(e), step)
            break
    stuck = [r for r in range(world) if pos[r] < len(streams[r])]
    if stuck:
        raise SimulationError(f"ranks {stuck} never finished: an exchange was not issued by every rank "
                              "(the programs' collective orders differ)")
    step_s, previous = [], 0.0
    for step in range(steps):
        end = max(step_end[r][step] for r in range(world))
        step_s.append(end - previous)
        previous = end
    peak = max(w + a + c for w, a, c in zip(replayed.weight_bytes, replayed.activation_bytes, replayed.cache_bytes))
    return Prediction(hardware.name, world, step_s, blocked[0], sent_total, peak, spans)


def _wait_region(e: Wait) -> str:
    return e.region if "wait" in e.region else f"wait {exchange_name(e.exchange)}"
