"""Where a step's time goes: an optional record of every compute region and exchange.

With profiling on (`compiled.to_runtime(profile=True)`), a rank records, per diffusion step:

    compute lane     contiguous spans, one per region of the program it ran: "blocks.3.attn",
                     "blocks.3 dense", "L3 experts", "L3 wait dispatch", ... (`instrument`, runtime/regions.py,
                     inserts a `mark` before the first node of each region)
    one lane per     each exchange from issue to landing ("L3 dispatch"), landing as first
    communicator     seen complete by the rank (at the next region boundary or wait): an
                     async collective's completion is invisible to torch's profiler (under
                     NCCL: until the wait that consumed it, on the GPU's clock; see Timeline)

Every span also runs under `torch.profiler.record_function`, so a torch profiler trace of
the same run shows moedit's regions beside torch's own events. `chrome_trace` merges every
rank's spans into one Chrome-trace JSON (a process per rank, a thread per lane; open it in
Perfetto or chrome://tracing) and `draw` renders all ranks' lanes as a PNG. With profiling
off nothing here runs: programs are not instrumented and ops skip the record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from .comm import MAIN, Exchange

COMPUTE = "compute"


@dataclasses.dataclass
class Span:
    lane: str  # COMPUTE or a communicator, e.g. "ep" / "ep stale"
    name: str
    start: float  # seconds, time.perf_counter() (one clock for every process on a machine)
    end: float
    step: int


def lane_of(exchange: Exchange) -> str:
    return exchange.axis if exchange.channel == MAIN else f"{exchange.axis} {exchange.channel}"


def exchange_name(exchange: Exchange) -> str:
    return exchange.name if exchange.layer is None else f"L{exchange.layer} {exchange.name}"


class Timeline:
    """One rank's spans, recorded on the thread that runs the programs.

    On the CPU (gloo) a span's ends are host times, and an exchange's landing is noticed at
    the first `mark` (or wait) after it completed: a callback on the work's future would run
    Python on the communication thread, and the GIL it takes there slowed the compute being
    measured by half. Under NCCL (`device` a CUDA device) the host runs ahead of the GPU, so
    the ends are CUDA events on the compute stream instead, put on the host clock at the end
    of each step (one sync); an exchange runs from the stream's position at its issue to the
    end of the wait that consumed it (it landed by then: exactly then if the stream was
    blocked on it)."""

    def __init__(self, rank: int, device: torch.device | str | None = None):
        self.rank = rank
        device = None if device is None else torch.device(device)
        self.device = device if device is not None and device.type == "cuda" else None
        self.spans: list[Span] = []
        self._open: tuple[str, object, int, object] | None = None  # name, start, step, record_function
        self._flying: list[tuple[Exchange, object, object, int]] = []  # exchange, work, issued, step
        self._ended: list[tuple[str, str, object, object, int]] = []  # spans whose ends are not host times yet
        self._seen: dict[int, float] = {}  # under NCCL: id(work) -> host time it was first seen complete

    def _now(self):
        """A host time, or under NCCL a CUDA event at the compute stream's current position."""
        if self.device is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def mark(self, name: str, step: int) -> None:
        """End the open compute span and open one called `name`."""
        now = self._now()
        self._close(now)
        self._landings(now)
        scope = torch.profiler.record_function(name)
        scope.__enter__()
        self._open = (name, now, step, scope)

    def end_step(self) -> None:
        now = self._now()
        self._close(now)
        self._landings(now)
        self._retire_seen()
        self._resolve()

    def _retire_seen(self) -> None:
        """Under NCCL: end the exchanges the host has seen complete but no wait consumed yet (a
        stale exchange waited for a step later, or one waited on the host) at the time they were
        first seen complete, and forget them, so that the in-flight list holds only exchanges
        still in flight. A later wait's event could not end them earlier: the host synchronises
        with the stream at the end of the step, after it saw them complete."""
        if self.device is None:
            return
        flying = []
        for exchange, work, start, step in self._flying:
            seen = self._seen.pop(id(work), None)
            if seen is None:
                flying.append((exchange, work, start, step))
            else:
                self._ended.append((lane_of(exchange), exchange_name(exchange), start, seen, step))
        self._flying = flying

    def forget_in_flight(self) -> None:
        """Drop the exchanges still recorded as in flight (a new sample: the runtime finished or
        abandoned them); the spans recorded so far stay."""
        self._flying.clear()
        self._seen.clear()

    def _close(self, now) -> None:
        if self._open is not None:
            name, start, step, scope = self._open
            scope.__exit__(None, None, None)
            self._ended.append((COMPUTE, name, start, now, step))
            self._open = None

    def issued(self, exchange: Exchange, work, step: int) -> None:
        """Record `exchange` from now until its work is seen complete (or, under NCCL, waited for)."""
        self._flying.append((exchange, work, self._now(), step))

    def waited(self, work, event) -> None:
        """Under NCCL: the compute stream has `work`'s result from `event` on (it landed by then,
        or by the host time it was first seen complete, whichever is earlier)."""
        for i, (exchange, other, start, step) in enumerate(self._flying):
            if other is work:
                seen = self._seen.pop(id(work), None)
                self._ended.append((lane_of(exchange), exchange_name(exchange), start, (event, seen), step))
                del self._flying[i]
                return

    def _landings(self, now) -> None:
        if self.device is not None:  # the span ends at `waited`; note when the host first sees it done
            for _, work, _, _ in self._flying:
                if id(work) not in self._seen and work.is_completed():
                    self._seen[id(work)] = time.perf_counter()
            return
        flying = []
        for exchange, work, start, step in self._flying:
            if work.is_completed():
                self._ended.append((lane_of(exchange), exchange_name(exchange), start, now, step))
            else:
                flying.append((exchange, work, start, step))
        self._flying = flying

    def _resolve(self, in_flight: bool = False) -> list[Span]:
        """Put the ended spans on the host clock, and return (with `in_flight`, under NCCL) the
        exchanges not yet waited for as spans ending now, named so. Those are drawn, not kept:
        they stay in flight, and a later snapshot draws them where they are then."""
        drawn = []
        if self.device is None:
            self.spans += [Span(*ended) for ended in self._ended]
        elif self._ended or in_flight and self._flying:
            last = self._now()
            last.synchronize()
            now = time.perf_counter()

            def host(stamp) -> float:
                if isinstance(stamp, float):  # a host time already (an exchange retired when seen complete)
                    return stamp
                if isinstance(stamp, tuple):  # (the wait's event, the host time it was first seen complete)
                    event, seen = stamp
                    return min(host(event), seen) if seen is not None else host(event)
                return now - stamp.elapsed_time(last) / 1e3

            self.spans += [Span(lane, name, host(start), host(end), step) for lane, name, start, end, step
                           in self._ended]
            if in_flight:
                drawn = [Span(lane_of(exchange), f"{exchange_name(exchange)} (in flight)", host(start), now, step)
                         for exchange, _, start, step in self._flying]
        self._ended = []
        return drawn

    def snapshot(self) -> list[Span]:
        if self.device is None:
            self._landings(time.perf_counter())
        drawn = self._resolve(in_flight=True)
        return sorted(self.spans + drawn, key=lambda s: s.start)


# -- merging ranks: Chrome trace and a picture ----------------------------------------

def chrome_trace(per_rank: list[list[Span]], path: str | os.PathLike) -> None:
    """Write every rank's spans as Chrome-trace JSON: a process per rank, a thread per lane."""
    origin = min((s.start for spans in per_rank for s in spans), default=0.0)
    events = []
    for rank, spans in enumerate(per_rank):
        lanes = _lanes(spans)
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
        for tid, lane in enumerate(lanes):
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": lane}})
        for s in spans:
            events.append({"ph": "X", "name": s.name, "pid": rank, "tid": lanes.index(s.lane),
                           "ts": 1e6 * (s.start - origin), "dur": 1e6 * (s.end - s.start), "args": {"step": s.step}})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


def _lanes(spans: list[Span]) -> list[str]:
    return [COMPUTE] + sorted({s.lane for s in spans} - {COMPUTE})


_COLOURS = {"wait": "#d62728", "attn": "#1f77b4", "dense": "#aec7e8", "experts": "#2ca02c", "shared": "#98df8a",
            "dispatch": "#9467bd", "combine": "#ff7f0e", "counts": "#8c564b", "other": "#c7c7c7"}


def _colour(span: Span) -> str:
    for key in ("wait", "attn", "dense", "experts", "shared", "dispatch", "combine", "counts"):
        if key in span.name:
            return _COLOURS[key]
    return _COLOURS["other"]


def draw(per_rank: list[list[Span]], path: str | os.PathLike, steps: range | None = None, title: str = "") -> None:
    """A PNG of every rank's lanes (compute, then one per communicator) over `steps`
    (default: every step but the first); waits are red, exchanges purple/orange/brown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    chosen = [[s for s in spans if steps is None and s.step > 0 or steps is not None and s.step in steps]
              for spans in per_rank]
    origin = min((s.start for spans in chosen for s in spans), default=0.0)
    rows = [(rank, lane) for rank, spans in enumerate(chosen) for lane in _lanes(spans)]
    fig, ax = plt.subplots(figsize=(16, 0.45 * len(rows) + 1.4))
    for y, (rank, lane) in enumerate(rows):
        spans = [s for s in chosen[rank] if s.lane == lane]
        ax.broken_barh([(1e3 * (s.start - origin), 1e3 * (s.end - s.start)) for s in spans], (y - 0.4, 0.8),
                       facecolors=[_colour(s) for s in spans], linewidth=0)
    ax.set_yticks(range(len(rows)), [f"rank {rank} {lane}" for rank, lane in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time from the start of the first step shown (ms)")
    ax.set_ylabel("rank and lane")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _COLOURS.items()], ncol=len(_COLOURS), fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 5 else -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
