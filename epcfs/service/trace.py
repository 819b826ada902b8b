"""What the daemon's EPC does, as it happens: the tracer behind `--trace` and `epcfs top`.

`Tracer`, the default, writes nothing: it only counts the EWB and ELDU leaves done on
behalf of each cgroup, which the enclave socket's `stats` op reports (`epcfs top` turns
them into rates). `ChromeTrace` also writes every event to a Chrome trace-event file,
which ui.perfetto.dev and chrome://tracing open:

- counters per cgroup, sampled every SAMPLE_INTERVAL and written when they change:
  `misc.current`, `misc.max` (while limited), `memory.current`, plus `EPC free`;
- durations (`X`) for reclaim rounds (sync per charging process, direct before EDMM
  pages, ksgxd, the per-cgroup async work) and EDMM ioctls, on one track per client
  process, one for ksgxd and one per cgroup's work item. They come from the one place
  every engine operation passes through, Stepper.drive: after each step the operation's
  generator chain (`gi_yieldfrom`) says which engine operations are in progress, and a
  round (`cgroup_reclaim_pages`) is named by the operation it serves (ROUND_NAMES);
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
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING

from ..model.constants import PAGE_COUNTER_MAX, PAGE_SIZE, SGX_EPC, U64_MAX
from ..model.engine import Steps
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

ROUND = "cgroup_reclaim_pages"
"""The engine operation that is one reclaim round, whoever runs it (model/reclaim.py)."""

BATCH = "reclaim_pages"
"""The engine operation that is one batch: its EWBs count for the css it scans."""

ROUND_NAMES = {"reclaim_direct": "direct reclaim", "ksgxd": "ksgxd reclaim",
               "work_item": "async reclaim"}
"""A round's duration is named by the nearest of these operations above it in the
chain; under none (an allocation's try_charge or its global fallback) it is the
charging process's "sync reclaim"."""

OPERATION_SPANS = ("restrict_permissions", "modify_types", "remove_pages")
"""Operations that are a duration of their own (the EDMM ioctls, with their page count):
the others are short, or their time is in their rounds."""


def _chain(steps: Steps) -> list[Generator]:
    """The generators an operation is suspended in, outermost first."""
    chain = []
    g = steps
    while g is not None and hasattr(g, "gi_code"):
        chain.append(g)
        g = g.gi_yieldfrom
    return chain


def _local(g: Generator, name: str):
    """A local variable (an argument) of a suspended or not yet started generator."""
    return g.gi_frame.f_locals.get(name) if g.gi_frame is not None else None


class Operation:
    """One engine operation as the tracer sees it, step by step (Stepper.drive): `css`
    is whom it works for, `pid` the process it runs for (None: a kernel thread)."""

    def __init__(self, tracer: Tracer, name: str, steps: Steps, css: MiscCss | None,
                 pid: int | None) -> None:
        self.tracer = tracer
        self.name = name
        self.steps = steps
        self.css = css
        self.pid = pid

    def stepped(self, before: Mapping[str, int], after: Mapping[str, int]) -> None:
        """Right after a step: its EWB/ELDU count for the css a batch in progress scans,
        else for the operation's css."""
        if any(after.get(leaf, 0) != before.get(leaf, 0) for leaf in METERED):
            batches = [g for g in _chain(self.steps) if g.gi_code.co_name == BATCH]
            css = _local(batches[-1], "css") if batches else self.css
            self.tracer.step(before, after, css)

    def settled(self) -> None:
        """After the step's time was spent (ChromeTrace: durations begin and end)."""

    def end(self) -> None:
        """The operation finished, failed or was abandoned."""


class Tracer:
    """Counts EWB/ELDU per cgroup; its trace methods do nothing (see ChromeTrace)."""

    def __init__(self) -> None:
        self.leaves: dict[MiscCss, Counter[str]] = {}

    def operation(self, name: str, steps: Steps, css: MiscCss | None,
                  pid: int | None) -> Operation:
        """An engine operation Stepper.drive is about to run (see Operation)."""
        return Operation(self, name, steps, css, pid)

    def step(self, before: Mapping[str, int], after: Mapping[str, int],
             css: MiscCss | None) -> None:
        """After a model step: its leaves go to `css`, the css worked for (None: none)."""
        if css is None:
            return
        for leaf in METERED:
            n = after.get(leaf, 0) - before.get(leaf, 0)
            if n:
                if css not in self.leaves:
                    self._forget_released()
                self.leaves.setdefault(css, Counter())[leaf] += n

    def _forget_released(self) -> None:
        """Drop the counts of released csses (their cgroups are gone), so a daemon that
        nobody asks for stats does not keep every cgroup that ever reclaimed."""
        for css in [css for css in self.leaves if css.dead]:
            del self.leaves[css]

    def instant(self, name: str, track: int | str | None, **args) -> None:
        """A moment on `track` (None: the daemon's process-wide track)."""

    def killed(self, cg: Cgroup, pids: list[int]) -> None:
        """A cgroup.kill of `cg`, whose members were `pids`: one instant each."""
        for pid in pids:
            self.instant("kill", pid, cgroup=cg.path)

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
        self._forget_released()
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

    def operation(self, name: str, steps: Steps, css: MiscCss | None,
                  pid: int | None) -> Operation:
        return TracedOperation(self, name, steps, css, pid)

    def duration(self, name: str, track: int | str, start: float, cost_us: float,
                 **args) -> None:
        """A duration on `track` from wall time `start` to now; `cost_us` is the
        simulated cost of the ENCLS work done in it."""
        end = time.time()
        self._emit({"name": name, "ph": "X", "ts": round(start * 1e6, 1),
                    "dur": round((end - start) * 1e6, 1), "pid": self.pid,
                    "tid": self._tid(track), "args": {**args, "cost_us": round(cost_us, 1)}})

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
        """How much the event count `key` rose since the last sample. A count below the
        last one belongs to a new cgroup at a removed one's path: all of it is new."""
        last = self.last.get(key, 0)
        self.last[key] = now
        return now - last if now >= last else now

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


class Span:
    """A duration in progress: where it goes, when it began, what it cost so far."""

    __slots__ = ("name", "start", "args", "cost_us")

    def __init__(self, name: str, start: float, **args) -> None:
        self.name = name
        self.start = start
        self.args = args
        self.cost_us = 0.0


class TracedOperation(Operation):
    """An Operation whose rounds (and, for OPERATION_SPANS, itself) become durations.

    A step's simulated cost goes to the durations open when it began. A round begins
    at the wall time its first step began and ends once the step that finished it has
    spent its time; the cost of that step's tail (e.g. the EADD after a try_charge
    round) counts in the round, as the round's first step (isolate) costs nothing."""

    tracer: ChromeTrace

    def __init__(self, tracer: ChromeTrace, name: str, steps: Steps, css: MiscCss | None,
                 pid: int | None) -> None:
        super().__init__(tracer, name, steps, css, pid)
        if pid is not None:
            self.track: int | str = pid
        elif css is None or css.cgroup.is_root:
            self.track = name
        else:
            self.track = f"{name} {css.cgroup.path}"
        self.began = time.time()
        self.rounds: dict[Generator, Span] = {}
        self.whole = (Span(name, self.began, count=_local(steps, "count"))
                      if name in OPERATION_SPANS else None)

    def stepped(self, before: Mapping[str, int], after: Mapping[str, int]) -> None:
        super().stepped(before, after)
        spent = cost(before, after, 1.0) * 1e6
        if spent:
            for span in self.rounds.values():
                span.cost_us += spent
            if self.whole is not None:
                self.whole.cost_us += spent

    def settled(self) -> None:
        chain = _chain(self.steps)
        rounds = [g for g in chain if g.gi_code.co_name == ROUND]
        for g in [g for g in self.rounds if g not in rounds]:
            self._close(self.rounds.pop(g))
        for g in rounds:
            if g not in self.rounds:
                self.rounds[g] = self._open(g, chain)
        self.began = time.time()

    def _open(self, round_: Generator, chain: list[Generator]) -> Span:
        callers = [g.gi_code.co_name for g in chain[:chain.index(round_)]]
        name = next((ROUND_NAMES[c] for c in reversed(callers) if c in ROUND_NAMES),
                    "sync reclaim")
        root = _local(round_, "root")
        return Span(name, self.began, cgroup=root.cgroup.path if root else None)

    def _close(self, span: Span) -> None:
        self.tracer.duration(span.name, self.track, span.start, span.cost_us, **span.args)

    def end(self) -> None:
        for span in self.rounds.values():
            self._close(span)
        self.rounds.clear()
        if self.whole is not None:
            self._close(self.whole)
            self.whole = None


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
