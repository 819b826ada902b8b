"""`--plot FILE.png`: a picture of a run, drawn from its trace (service.trace).

`plotted` gives `epcfs run` and `epcfs selftest` the trace file their daemon writes (a
temporary one without --trace) and draws the figure once the daemon is gone.

Top panel: sgx_epc in use (misc.current) per cgroup over the run, in MiB on a log scale
(limits span capacity/512 to capacity), one colour per cgroup, its limit (misc.max)
dashed in the same colour, charge failures as small crosses just above the limit. Bottom panel:
memory.current per cgroup, memcg OOM kills as red stars. Grey vertical lines mark the
script's own stage lines (`# Start …`, `PASS: …`, `FAIL: …`) at the time it printed
them, numbered, with the texts listed below.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence

from ..service.trace import load

MIB = 1 << 20

STAGE_PREFIXES = ("# Start", "PASS:", "FAIL:", "SKIP:", "# Killed")
"""Script lines that mark a stage of a selftest run (the final script's wording)."""


def add_plot_option(p: argparse.ArgumentParser) -> None:
    """--plot, for run and selftest."""
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw EPC use per cgroup over the run (limits, failures, OOM kills"
                        "; selftest: the script's stages) into this PNG at the end")


@contextlib.contextmanager
def plotted(args: argparse.Namespace, marks: Sequence[tuple[float, str]]) -> Iterator[str | None]:
    """Yields the trace file the daemon is to write: --trace's, or with only --plot a
    temporary one. Afterwards (the daemon gone, its trace complete) draws --plot's
    figure from it, with the output lines in `marks` as stage marks."""
    plot, trace, scratch = getattr(args, "plot", None), getattr(args, "trace", None), None
    if plot and importlib.util.find_spec("matplotlib") is None:  # known before the run
        print("epcfs: --plot needs matplotlib (the `observe` extra)", file=sys.stderr)
        raise SystemExit(2)
    if plot and not trace:
        fd, trace = tempfile.mkstemp(prefix="epcfs-trace-", suffix=".json")
        os.close(fd)
        scratch = trace
    try:
        yield trace
        if plot and os.path.getsize(trace):
            script = getattr(args, "script", None)
            title = (f"epcfs selftest {os.path.basename(script)}" if script
                     else f"epcfs run {' '.join(args.command)}")
            try:
                draw(trace, plot, marks, title=title)
            except (OSError, ValueError) as e:
                print(f"epcfs: --plot {plot}: {getattr(e, 'strerror', None) or e}",
                      file=sys.stderr)
    finally:
        if scratch:
            os.unlink(scratch)


def stages(marks: Sequence[tuple[float, str]]) -> list[tuple[float, str]]:
    """The stage lines among (wall time, line) pairs of a script's output."""
    return [(t, line.strip()) for t, line in marks if line.strip().startswith(STAGE_PREFIXES)]


def draw(trace_path: str, png_path: str, marks: Sequence[tuple[float, str]] = (),
         title: str = "EPC per cgroup") -> None:
    """Write the figure of the trace at `trace_path` (and the output `marks`) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Titles, cgroup names and script lines are text, never TeX ($$ in a command line).
    with plt.rc_context({"text.parse_math": False}):
        _draw(load(trace_path), png_path, marks, title)


def _draw(events: list[dict], png_path: str, marks: Sequence[tuple[float, str]],
          title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    times = [e["ts"] for e in events if "ts" in e]
    t0 = min(times) if times else 0.0
    t_end = (max(times) - t0) / 1e6 if times else 0.0
    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    failed: dict[str, list[float]] = defaultdict(list)
    kills: list[tuple[float, str]] = []
    for e in events:
        t = (e.get("ts", t0) - t0) / 1e6
        if e.get("ph") == "C":
            kind, _, path = e["name"].partition(" ")
            series[kind][path].append((t, e["args"]["bytes"] / MIB))
        elif e.get("name") == "charge failed":
            failed[e["args"]["cgroup"]].append(t)
        elif e.get("name") == "OOM kill":
            kills.append((t, e["args"]["cgroup"]))

    used = series["misc.current"]
    paths = sorted(p for p, pts in used.items() if p != "/" and any(v > 0 for _, v in pts))
    palette = plt.get_cmap("tab10")
    colour = {p: palette(i % 10) for i, p in enumerate(paths)}
    colour["/"] = "0.6"
    shown = ["/", *paths]
    prefix = os.path.commonpath(paths) if len(paths) > 1 else ""
    prefix = "" if prefix == "/" else prefix

    fig, (epc, mem) = plt.subplots(2, 1, figsize=(14, 9), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.4]})
    limits = [v for p in shown for _, v in series["misc.max"].get(p, []) if v > 0]
    # Limits span orders of magnitude (capacity/512 … capacity): a log scale above
    # the smallest limit's half shows every cgroup; linear below it, down to 0.
    floor = min(limits, default=1.0) / 2
    epc.set_yscale("symlog", base=2, linthresh=floor, linscale=0.5)
    top = max([v for p in shown for _, v in used.get(p, [])] + limits + [floor * 2])
    ticks = [0.0] + [floor * 2 ** k for k in range(64) if floor * 2 ** k <= top * 1.01]
    epc.set_yticks(ticks, [_mib(t) for t in ticks])
    epc.set_ylim(0, top * 1.4)
    handles = []
    for path in shown:
        if path == "/":
            label = "all cgroups (root)"
        elif path == prefix:
            label = f"{os.path.basename(path)} (all below)"
        else:
            label = path[len(prefix):].lstrip("/") if prefix else path
        lw = 1.0 if path == "/" else 1.8
        _steps(epc, used.get(path, []), t_end, colour[path], lw=lw)
        limit = series["misc.max"].get(path)
        if limit:
            _steps(epc, limit, t_end, colour[path], ls="--", lw=1.0)
        if failed.get(path):
            # Just above the limit line, where the crosses are not drawn over.
            epc.scatter(failed[path],
                        [1.3 * _at(limit or used.get(path, []), t) for t in failed[path]],
                        marker="x", s=14, color=colour[path], linewidths=0.8, zorder=3)
        _steps(mem, series["memory.current"].get(path, []), t_end, colour[path], lw=1.2)
        handles.append(Line2D([], [], color=colour[path], lw=lw, label=label))
    if kills:
        mem.scatter([t for t, _ in kills],
                    [_at(series["memory.current"].get(p, []), t) for t, p in kills],
                    marker="*", s=140, color="red", zorder=4)
    handles += [
        Line2D([], [], color="0.3", ls="--", lw=1.0, label="misc.max (limit)"),
        Line2D([], [], color="0.3", marker="x", ls="", label="charge failed (above its limit)"),
        Line2D([], [], color="red", marker="*", ls="", markersize=11,
               label="memcg OOM kill (lower panel)"),
    ]
    steps = stages(marks)
    for numbers, x in _merged(steps, t0, t_end):
        for ax in (epc, mem):
            ax.axvline(x, color="0.75", lw=0.8, zorder=0)
        epc.annotate(numbers, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                     ha="center", va="bottom", color="0.25")
    epc.set_title(title, loc="left", pad=16)
    epc.set_ylabel("sgx_epc in use, misc.current (MiB)")
    mem.set_ylabel("memory.current (MiB)")
    mem.set_xlabel("seconds since the daemon started")
    mem.set_ylim(bottom=0)
    epc.set_xlim(0, max(t_end, 1e-3))
    legend_title = f"cgroups under {prefix}" if prefix else "cgroups"
    epc.legend(handles=handles, title=legend_title, loc="upper left",
               bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=8, frameon=False)
    if steps:
        text = "\n".join(f"{n:>2}  {_short(line)}" for n, (_, line) in enumerate(steps, 1))
        fig.text(0.01, 0.01, text, fontsize=7, family="monospace", va="bottom")
        fig.subplots_adjust(bottom=0.08 + 0.0125 * len(steps))
    fig.subplots_adjust(left=0.07, right=0.8, top=0.94, hspace=0.08)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _merged(steps: list[tuple[float, str]], t0: float, t_end: float) -> list[tuple[str, float]]:
    """Stage marks as (label, x): marks closer than 2.5% of the run share one line,
    labelled with the first and last of their numbers (a PASS and the next Start)."""
    out: list[tuple[list[int], float]] = []
    for n, (t, _) in enumerate(steps, 1):
        x = (t * 1e6 - t0) / 1e6
        if out and x - out[-1][1] < 0.025 * max(t_end, 1e-3):
            out[-1][0].append(n)
        else:
            out.append(([n], x))
    return [(str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}", x) for ns, x in out]


def _mib(value: float) -> str:
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.3g}"


def _steps(ax, points: list[tuple[float, float]], t_end: float, colour, **style) -> None:
    """A counter as a step line held until the end of the run."""
    if not points:
        return
    xs = [t for t, _ in points] + [t_end]
    ys = [v for _, v in points] + [points[-1][1]]
    ax.plot(xs, ys, drawstyle="steps-post", color=colour, **style)


def _at(points: list[tuple[float, float]] | None, t: float) -> float:
    """A step counter's value at time t."""
    value = 0.0
    for when, v in points or ():
        if when > t:
            break
        value = v
    return value


def _short(line: str, width: int = 110) -> str:
    return line if len(line) <= width else line[:width - 1] + "…"
