"""`epcfs selftest [mount options] PATH/TO/run_epc_cg_selftests.sh`.

Runs a kernel tree's SGX cgroup selftest script unchanged, as root, where /sys/fs/cgroup
is epcfs (see `epcfs run`), from a scratch working directory holding the script's
sibling files from the user's tree (ash_cgexec.sh and friends) and our simulated
./test_sgx in place of the real binary.

The final scripts run `swapoff -a` and `swapon -a`; on a user's machine that would turn
the host's swap off and on for real, so stand-ins that do nothing come first on PATH.
Swap is not modelled anyway: epcfs's memory controller never swaps.

The script's output passes through line by line: as TAP 13 with --tap (what the
kselftest runner prints: the lines as `# ` comments, then `ok`/`not ok`), under a live
status line (elapsed time, EPC per cgroup, processes) when stdout is a terminal, and
with each line's time kept as a stage mark for --plot.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from ..service.daemon import add_mount_options
from .plot import add_plot_option
from .run import KSFT_SKIP, run_in_epcfs, sigint_default

STAND_INS = ("swapoff", "swapon")
"""Host-changing commands the scripts call that must not reach the host."""

PROVIDED = ("test_sgx", "test_encl.elf")
"""Files the scripts run from their directory that need not be there: epcfs puts its own
test_sgx in, which needs no test_encl.elf."""

STATUS_REFRESH = 2
"""Redraws of the status line per second."""

PIPE_QUIET = 0.2
"""Seconds without output after which an exited script's pipe counts as done."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_mount_options(p)
    add_plot_option(p)
    p.add_argument("--tap", action="store_true",
                   help="print TAP 13 as the kselftest runner does (the script's output "
                        "as # comments, then ok / not ok)")
    p.add_argument("--shell", metavar="SHELL",
                   help="run the script with this shell (e.g. bash, dash, 'busybox ash') "
                        "instead of its #! line")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (logs the script writes) and print it")
    p.add_argument("script", metavar="SCRIPT", help="path to run_epc_cg_selftests.sh")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:  # first, as the kernel's scripts check it before anything
        print("epcfs: needs root (it creates a mount namespace): skipping", file=sys.stderr)
        return KSFT_SKIP
    script = os.path.abspath(args.script)
    if not os.path.isfile(script):
        print(f"epcfs selftest: {args.script}: no such file", file=sys.stderr)
        return 1
    for name in missing_siblings(script):
        print(f"epcfs selftest: warning: the script runs ./{name}, which is not in "
              f"{os.path.dirname(script)}", file=sys.stderr)
    scratch = tempfile.mkdtemp(prefix="epcfs-selftest-")
    try:
        prepare(script, scratch)
        name = "./" + os.path.basename(script)
        # Through a shell, as the kselftest runner does: a script whose first line is not
        # a valid #! (one version starts with "##!") still runs, with sh.
        command = [*args.shell.split(), name] if args.shell else ["/bin/sh", "-c", name]
        marks: list[tuple[float, str]] = []
        collection = os.path.basename(os.path.dirname(script))
        test = f"selftests: {collection}: {os.path.basename(script)}"
        if args.tap:
            print(f"TAP version 13\n1..1\n# {test}", flush=True)

        def runner(command: Sequence[str], socket: str, **kwargs) -> int:
            return pump(command, socket, marks, tap=args.tap, **kwargs)

        status = run_in_epcfs(args, command, cwd=scratch, runner=runner, marks=marks,
                              path_prefix=os.path.join(scratch, ".epcfs-bin"))
        if args.tap:
            print(tap_result(test, status), flush=True)
        return status
    finally:
        if args.keep:
            print(f"epcfs selftest: scratch directory kept at {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def prepare(script: str, scratch: str) -> None:
    """Copy the script's directory (files only), then put our test_sgx and stand-ins in."""
    source = os.path.dirname(script)
    for entry in os.scandir(source):
        if entry.is_file() and entry.name != "test_sgx":
            shutil.copy2(entry.path, os.path.join(scratch, entry.name))
    test_sgx = shutil.which("test_sgx", path=os.path.dirname(sys.executable))
    if test_sgx is None:
        raise SystemExit("epcfs selftest: the test_sgx console script is not installed")
    os.symlink(test_sgx, os.path.join(scratch, "test_sgx"))
    bin_dir = os.path.join(scratch, ".epcfs-bin")
    os.mkdir(bin_dir)
    for name in STAND_INS:
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\n# epcfs selftest: {name} would change the host; do nothing.\n")
        os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def missing_siblings(script: str) -> list[str]:
    """Files the script runs as ./NAME that are neither beside it nor provided by epcfs."""
    try:
        with open(script, errors="replace") as f:
            names = set(re.findall(r"(?<![\w/.])\./([\w.-]+)", f.read()))
    except OSError:
        return []
    here = os.path.dirname(script)
    return sorted(n for n in names - set(PROVIDED)
                  if n != os.path.basename(script) and not os.path.exists(os.path.join(here, n)))


def tap_result(test: str, status: int) -> str:
    """The kselftest runner's result line for a script that exited with `status`."""
    if status == 0:
        return f"ok 1 {test}"
    if status == KSFT_SKIP:
        return f"ok 1 {test} # SKIP"
    return f"not ok 1 {test} # exit={status}"


def pump(command: Sequence[str], socket: str, marks: list[tuple[float, str]], *, tap: bool,
         **kwargs) -> int:
    """Run the script, passing its output on line by line (see the module) and noting
    when each line came in `marks`. Returns its status as a shell reports it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the script's
    try:
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if tap else None,
                                preexec_fn=sigint_default, **kwargs)
        with proc, Output(socket) as emit:
            for line in lines_until_exit(proc):
                marks.append((time.time(), line))
                emit(f"# {line}" if tap else line)
        status = proc.returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - status if status < 0 else status


def lines_until_exit(proc: subprocess.Popen) -> Iterator[str]:
    """The lines `proc` writes to its stdout pipe until it has exited and the pipe is
    quiet: a background child that outlives the script and keeps the pipe open does
    not hold the run (as with `call`, the script's exit ends it)."""
    fd, pending = proc.stdout.fileno(), b""
    while True:
        ready, _, _ = select.select([fd], [], [], PIPE_QUIET)
        chunk = os.read(fd, 65536) if ready else b""
        if ready and chunk:
            *whole, pending = (pending + chunk).split(b"\n")
            yield from (raw.decode(errors="replace") for raw in whole)
        elif not ready and proc.poll() is None:
            continue
        else:  # end of the pipe, or the script exited and nothing more came
            break
    proc.wait()
    if pending:
        yield pending.decode(errors="replace")


class Output:
    """Where the script's lines go: stdout as they are, or on a terminal above a live
    status line (rich's Live keeps it under the output)."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.start = time.monotonic()
        self.live = None
        self.reply: dict | None = None
        self.asked = float("-inf")

    def __enter__(self):
        if not sys.stdout.isatty():
            return self.plain
        try:
            from rich.live import Live
        except ImportError:  # epcfs without its `observe` extra: no status line
            return self.plain

        self.live = Live(self, transient=True, refresh_per_second=STATUS_REFRESH)
        self.live.__enter__()
        return self.above

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    @staticmethod
    def plain(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def above(self, line: str) -> None:
        self.live.console.print(line, markup=False, highlight=False, emoji=False)

    def __rich__(self):
        from rich.text import Text

        from .top import ask, size

        # Live renders this under every line the script prints too: ask the daemon at
        # most once per refresh, so a chatty script never waits on it.
        now = time.monotonic()
        if now - self.asked >= 1 / STATUS_REFRESH:
            self.reply, self.asked = ask(self.socket), now
        elapsed, reply = now - self.start, self.reply
        parts = [f"epcfs selftest {int(elapsed) // 60}:{int(elapsed) % 60:02d}"]
        if reply is not None:
            rows = [r for r in reply["rows"] if r["path"] != "/"]
            using = [f"{r['path'].rsplit('/', 1)[-1]} {size(r['epc'])}"
                     for r in rows if r["epc"]]
            parts.append("EPC " + (", ".join(using) or "idle"))
            parts.append(f"{sum(r['procs'] for r in rows)} processes")
        return Text("  |  ".join(parts), style="reverse")

