"""`--plot FILE.png`: a picture of a run, drawn from its trace (service.trace).

Top panel: sgx_epc in use (misc.current) per cgroup over the run, in MiB, one colour per
cgroup, its limit (misc.max) dashed in the same colour, charge failures as small
crosses on the limit and OOM kills as red stars. Bottom panel: memory.current per
cgroup. Grey vertical lines mark the script's own stage lines (`# Start …`, `PASS: …`,
`FAIL: …`) at the time it printed them, numbered, with the texts listed below.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from ..service.trace import load

MIB = 1 << 20

STAGE_PREFIXES = ("# Start", "PASS:", "FAIL:", "SKIP:", "# Killed")
"""Script lines that mark a stage of a selftest run (the final script's wording)."""


def stages(marks: Sequence[tuple[float, str]]) -> list[tuple[float, str]]:
    """The stage lines among (wall time, line) pairs of a script's output."""
    return [(t, line.strip()) for t, line in marks if line.strip().startswith(STAGE_PREFIXES)]


def draw(trace_path: str, png_path: str, marks: Sequence[tuple[float, str]] = (),
         title: str = "EPC per cgroup") -> None:
    """Write the figure of the trace at `trace_path` (and the output `marks`) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = load(trace_path)
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
    paths = [p for p, pts in used.items() if p != "/" and any(v > 0 for _, v in pts)]
    palette = plt.get_cmap("tab10")
    colour = {p: palette(i % 10) for i, p in enumerate(sorted(paths))}
    colour["/"] = "0.55"
    shown = ["/", *sorted(paths)]

    steps = stages(marks)
    fig, (epc, mem) = plt.subplots(2, 1, figsize=(14, 9), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.4]})
    for path in shown:
        label = "all (root)" if path == "/" else path
        _steps(epc, used.get(path, []), t_end, colour[path], label, lw=1.0 if path == "/" else 1.6)
        limit = series["misc.max"].get(path)
        if limit:
            _steps(epc, limit, t_end, colour[path], f"{path} misc.max", ls="--", lw=1.0)
        if failed.get(path):
            ys = [_at(limit or used.get(path, []), t) for t in failed[path]]
            epc.scatter(failed[path], ys, marker="x", s=12, color=colour[path], linewidths=0.8,
                        label=f"{path} charge failed", zorder=3)
        _steps(mem, series["memory.current"].get(path, []), t_end, colour[path], label, lw=1.2)
    if kills:
        epc.scatter([t for t, _ in kills], [_at(used.get(p, []), t) for t, p in kills],
                    marker="*", s=120, color="red", label="OOM kill", zorder=4)
    for n, (t, _) in enumerate(steps, 1):
        x = (t * 1e6 - t0) / 1e6
        for ax in (epc, mem):
            ax.axvline(x, color="0.7", lw=0.8, zorder=0)
        epc.annotate(str(n), (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                     ha="center", va="bottom", color="0.3")
    epc.set_title(title, loc="left")
    epc.set_ylabel("sgx_epc in use (MiB)")
    mem.set_ylabel("memory.current (MiB)")
    mem.set_xlabel("seconds since the daemon started")
    epc.set_ylim(bottom=0)
    mem.set_ylim(bottom=0)
    epc.set_xlim(0, max(t_end, 1e-3))
    epc.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if steps:
        text = "\n".join(f"{n:>2}  {_short(line)}" for n, (_, line) in enumerate(steps, 1))
        fig.text(0.01, 0.01, text, fontsize=7, family="monospace", va="bottom")
        fig.subplots_adjust(bottom=0.08 + 0.0125 * len(steps))
    fig.subplots_adjust(left=0.06, right=0.78, top=0.95, hspace=0.08)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _steps(ax, points: list[tuple[float, float]], t_end: float, colour, label: str,
           **style) -> None:
    """A counter as a step line held until the end of the run."""
    if not points:
        return
    xs = [t for t, _ in points] + [t_end]
    ys = [v for _, v in points] + [points[-1][1]]
    ax.plot(xs, ys, drawstyle="steps-post", color=colour, label=label, **style)


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
