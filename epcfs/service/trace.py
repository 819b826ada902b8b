"""What the daemon's EPC does, as it happens: the tracer behind `--trace` and `epcfs top`.

`Tracer`, the default, writes nothing: it only counts the EWB and ELDU leaves done on
behalf of each cgroup, which the enclave socket's `stats` op reports (`epcfs top` turns
them into rates). `ChromeTrace` also writes every event to a Chrome trace-event file,
which ui.perfetto.dev and chrome://tracing open:

- counters per cgroup, sampled every SAMPLE_INTERVAL and written when they change:
  `misc.current`, `misc.max` (while limited), `memory.current`, plus `EPC free`;
- durations (`X`) for reclaim rounds (sync per charging process, direct before EDMM
  pages, ksgxd, the per-cgroup async work) and EDMM ioctls, on one track per client
  process, one for ksgxd and one per cgroup's work item;
- instants for failed charges (misc.events.local `max` rising) and OOM kills
  (memory.events.local `oom_kill` rising) per cgroup, ENOMEM and SIGBUS replies, and a
  process's moves between cgroups and its exit, on the process's track.

Timestamps are wall time in µs (time.time()); each duration's `cost_us` argument is the
simulated cost of the ENCLS work done inside it (timing.COST_US, before --time-scale).
The file is the JSON Array Format, written as it goes and flushed after every sample:
the format allows the closing `]` to be missing, so a killed daemon still leaves a file
the viewers open (and `load` reads). A clean close writes the `]`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ..model.constants import PAGE_COUNTER_MAX, PAGE_SIZE, SGX_EPC, U64_MAX
from ..protocol import MAX_MESSAGE, encode
from .timing import cost

if TYPE_CHECKING:
    from ..model.cgroup import Cgroup
    from ..model.misc import MiscCss
    from ..model.sgx import Sgx

SAMPLE_INTERVAL = 0.02
"""Seconds between counter samples: 50 a second draws a load's rise and fall (the
fastest, a capacity/512 load, lasts ~20 s) and a whole selftest run stays a few MB."""

METERED = ("EWB", "ELDU")
"""The leaves counted per cgroup for `epcfs top`'s reclaim rates."""

TRACK_BASE = 10_000_000
"""First tid of the named tracks (ksgxd, work items): above any pid (pid_max ≤ 2^22)."""

_spans: ContextVar[tuple[Span, ...]] = ContextVar("epcfs_trace_spans", default=())
"""The spans open in this trio task, outermost first (a task's context is its own)."""
_behalf: ContextVar[MiscCss | None] = ContextVar("epcfs_trace_behalf", default=None)
"""The misc css whose pages this task's model steps work on (EWB/ELDU attribution)."""


class Span:
    """One open duration; the simulated cost of the steps inside it accumulates here."""

    __slots__ = ("cost_us",)

    def __init__(self) -> None:
        self.cost_us = 0.0


class Tracer:
    """Counts EWB/ELDU per cgroup; its trace methods do nothing (see ChromeTrace)."""

    def __init__(self) -> None:
        self.leaves: dict[MiscCss, Counter[str]] = {}

    @contextlib.contextmanager
    def on_behalf(self, css: MiscCss) -> Iterator[None]:
        """Model steps inside are work on `css`'s pages: its EWB/ELDU count."""
        token = _behalf.set(css)
        try:
            yield
        finally:
            _behalf.reset(token)

    def step(self, before: dict[str, int], after: Counter[str]) -> None:
        """After each model step (Stepper): its leaves go to the css worked for."""
        css = _behalf.get()
        if css is None:
            return
        for leaf in METERED:
            n = after.get(leaf, 0) - before.get(leaf, 0)
            if n:
                self.leaves.setdefault(css, Counter())[leaf] += n

    def span(self, name: str, track: int | str, **args) -> contextlib.AbstractContextManager:
        """A duration on `track` (a client pid, or a named track such as "ksgxd")."""
        return contextlib.nullcontext()

    def instant(self, name: str, track: int | str | None, **args) -> None:
        """A moment on `track` (None: the daemon's process-wide track)."""

    def replied(self, pid: int, reply: dict) -> None:
        """An enclave reply went to `pid`: ENOMEM and SIGBUS become instants."""
        if reply.get("errno") == errno.ENOMEM:
            self.instant("ENOMEM", pid)
        elif "signal" in reply:
            self.instant(reply["signal"], pid)

    async def run(self, sgx: Sgx) -> None:
        """The sampling task (ChromeTrace); nothing to do here."""

    def close(self) -> None:
        """Finish the file (ChromeTrace)."""

    def stats(self, sgx: Sgx) -> dict:
        """The `stats` op's reply: the EPC's capacity, and a row per live cgroup of the
        misc hierarchy in tree order, as many as fit in one reply datagram."""
        rows = self._rows(sgx)
        reply = {"capacity": sgx.h.misc.capacity[SGX_EPC], "rows": rows}
        while len(encode({"ok": True, **reply})) > MAX_MESSAGE:
            rows[len(rows) * 3 // 4:] = []
        return reply

    def _rows(self, sgx: Sgx) -> list[dict]:
        enclaves = Counter(sgx.h.misc_of(e.owner).cgroup for e in sgx.enclaves.values()
                           if not e.released)
        for css in [css for css in self.leaves if css.dead]:
            del self.leaves[css]  # released: its cgroup is gone from the rows too
        leaves = {css.cgroup: counts for css, counts in self.leaves.items()}
        rows = []
        for cg in sgx.h.root.walk():
            css = cg.misc
            res = css.res[SGX_EPC] if css is not None else None
            mem = _memcg(sgx, cg)
            rows.append({
                "path": cg.path,
                "epc": res.usage if res else None,
                "epc_max": res.max if res and res.max != U64_MAX else None,
                "epc_peak": res.watermark if res else None,
                "epc_events": res.events if res else None,
                "mem": mem.usage * PAGE_SIZE if mem else None,
                "mem_max": (mem.max * PAGE_SIZE if mem and mem.max != PAGE_COUNTER_MAX
                            else None),
                "oom_kill": mem.events["oom_kill"] if mem else None,
                "ewb": leaves.get(cg, {}).get("EWB", 0),
                "eldu": leaves.get(cg, {}).get("ELDU", 0),
                "enclaves": enclaves.get(cg, 0),
                "procs": len(cg.procs),
            })
        return rows


def _memcg(sgx: Sgx, cg: Cgroup):
    """The memory css shown beside a misc cgroup: its own (v2), or the memory
    hierarchy's cgroup of the same path (v1); None where there is none."""
    if sgx.h.mem is sgx.h:
        return None if cg.is_root else cg.memory  # no memory.current at the v2 root
    with contextlib.suppress(OSError):
        return sgx.h.mem.lookup(cg.path).memory
    return None


class ChromeTrace(Tracer):
    """A Tracer that also writes the Chrome trace-event file at `path` (see the module)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.file = open(path, "w")  # noqa: SIM115 (closed in close())
        self.file.write("[")
        self.separator = "\n"
        """Written before each event: no trailing comma even if the daemon dies."""
        self.pid = os.getpid()
        self.tracks: dict[int | str, int] = {}
        self.last: dict[str, int] = {}
        """Each counter's last written value; also misc/memory event counts per cgroup."""
        self.procs: dict[int, Cgroup] = {}
        self._emit({"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
                    "args": {"name": f"epcfs daemon {self.pid}"}})

    def _emit(self, event: dict) -> None:
        self.file.write(self.separator)
        self.file.write(json.dumps(event, separators=(",", ":")))
        self.separator = ",\n"

    def _tid(self, track: int | str | None) -> int:
        """The tid of a track, naming it (an `M` event) the first time it is used."""
        if track is None:
            return 0
        tid = self.tracks.get(track)
        if tid is None:
            tid = track if isinstance(track, int) else TRACK_BASE + len(self.tracks)
            self.tracks[track] = tid
            name = f"pid {track}" if isinstance(track, int) else track
            self._emit({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                        "args": {"name": name}})
        return tid

    def step(self, before: dict[str, int], after: Counter[str]) -> None:
        super().step(before, after)
        spans = _spans.get()
        if spans:
            spent = cost(before, after, 1.0) * 1e6
            for span in spans:
                span.cost_us += spent

    @contextlib.contextmanager
    def span(self, name: str, track: int | str, **args) -> Iterator[Span]:
        span = Span()
        token = _spans.set((*_spans.get(), span))
        start = time.time()
        try:
            yield span
        finally:
            end = time.time()
            _spans.reset(token)
            self._emit({"name": name, "ph": "X", "ts": round(start * 1e6, 1),
                        "dur": round((end - start) * 1e6, 1), "pid": self.pid,
                        "tid": self._tid(track),
                        "args": {**args, "cost_us": round(span.cost_us, 1)}})

    def instant(self, name: str, track: int | str | None, **args) -> None:
        self._emit({"name": name, "ph": "i", "s": "t" if track is not None else "p",
                    "ts": round(time.time() * 1e6, 1), "pid": self.pid,
                    "tid": self._tid(track), "args": args})

    def counter(self, name: str, value: int) -> None:
        """A counter track's new value, written only when it changed."""
        if self.last.get(name) != value:
            self.last[name] = value
            self._emit({"name": name, "ph": "C", "ts": round(time.time() * 1e6, 1),
                        "pid": self.pid, "args": {"bytes": value}})

    def _rose(self, key: str, now: int) -> int:
        """How much the event count `key` rose since the last sample."""
        delta = now - self.last.get(key, now)
        self.last[key] = now
        return delta

    def sample(self, sgx: Sgx) -> None:
        """Counters, failed charges and OOM kills per cgroup; moves and exits."""
        self.counter("EPC free", sgx.free_pages * PAGE_SIZE)
        for cg in sgx.h.root.walk():
            if cg.misc is None:
                continue
            res = cg.misc.res[SGX_EPC]
            self.counter(f"misc.current {cg.path}", res.usage)
            if res.max != U64_MAX or f"misc.max {cg.path}" in self.last:
                self.counter(f"misc.max {cg.path}", min(res.max, sgx.h.misc.capacity[SGX_EPC]))
            if failed := self._rose(f"misc.events.local {cg.path}", res.events_local):
                self.instant("charge failed", None, cgroup=cg.path, count=failed)
        for cg in sgx.h.mem.root.walk():
            if cg.memory is None:
                continue
            self.counter(f"memory.current {cg.path}", cg.memory.usage * PAGE_SIZE)
            if kills := self._rose(f"oom_kill {cg.path}", cg.memory.events_local["oom_kill"]):
                self.instant("OOM kill", None, cgroup=cg.path, count=kills)
        procs = sgx.h.procs
        for pid, cg in procs.items():
            if self.procs.get(pid) is not cg:
                self.instant("move", pid, cgroup=cg.path)
        for pid in self.procs.keys() - procs.keys():
            self.instant("exit", pid)
        self.procs = dict(procs)

    async def run(self, sgx: Sgx) -> None:
        import trio

        while True:
            self.sample(sgx)
            self.file.flush()
            await trio.sleep(SAMPLE_INTERVAL)

    def close(self) -> None:
        if self.file.closed:
            return
        self._emit({"name": "trace_end", "ph": "i", "s": "p",
                    "ts": round(time.time() * 1e6, 1), "pid": self.pid, "tid": 0})
        self.file.write("\n]\n")  # now strict JSON
        self.file.close()


def load(path: str) -> list[dict]:
    """The events of a trace file, finished or cut off by a killed daemon (a missing
    `]`, a trailing comma, a half-written last line)."""
    with open(path) as f:
        text = f.read()
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(text)
    events = []
    for line in text.removeprefix("[").splitlines():
        line = line.strip().removeprefix(",").rstrip(",")
        if line and line != "]":
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line being written when the daemon died
    return events
