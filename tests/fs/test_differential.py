"""The same shell session against the kernel's cgroup2 and against epcfs: every exit
status, every line printed and every error message must be the same.

Needs a writable cgroup2 hierarchy (these machines have /sys/fs/cgroup/unified with only
the hugetlb controller); skipped where there is none.

What is comparable, and how:
- Core semantics (mkdir/rmdir rules, the cgroup.* files' contents, modes and parse
  errors, cgroup.procs moves, EBUSY for populated cgroups, cgroup.kill, cgroup.freeze as
  seen in cgroup.events, max.depth/max.descendants EAGAIN, names that cannot be made) are
  compared directly.
- Controller rules: the two sides share no controller (the kernel here has hugetlb, epcfs
  has memory and misc), so each side runs the same script with $C set to one of its own
  domain controllers (hugetlb on the kernel, misc on epcfs), and outputs are compared
  with that name replaced by "C". This compares the rules (ENOENT for a controller not in
  cgroup.controllers, EBUSY for enabling with processes, for moving into a cgroup whose
  subtree_control enables one, and for disabling one a child still uses), not any
  controller's own files. `+nosuch` (EINVAL on both) covers unknown names; a controller
  the kernel knows but epcfs does not (+cpu) is EINVAL on epcfs and may be ENOENT on a
  real kernel, so it is not compared.
- The kernel enables $C in its root's subtree_control for the duration if it was off.
- Not compared: the files only one side has (cpu.*, *.pressure, memory.*, misc.*),
  cgroup.stat's per-controller lines, dying-descendant counts right after rmdir (the
  kernel frees them after an RCU grace period), timestamps, inode numbers.
- epcfs runs with `--file-size zero`, cgroupfs's sizes; `auto` may report sizes on a
  kernel whose FUSE splice needs them (tests/fs/test_sizes.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from .util import TIMEOUT, bash, read, remove_tree, wait_for

REAL = Path("/sys/fs/cgroup/unified")

CORE_FILES = r"cgroup\.(controllers|events|freeze|kill|max\.depth|max\.descendants|procs|stat|subtree_control|threads|type)"  # noqa: E501

WAIT_FROZEN = ("for i in $(seq 300); do grep -q 'frozen 1' a/cgroup.events && break; "
               "sleep 0.01; done")
WAIT_EMPTY = ("for i in $(seq 300); do grep -q 'populated 0' a/cgroup.events && break; "
              "sleep 0.01; done")

SCRIPT = [
    "cat cgroup.controllers",
    "cat cgroup.subtree_control",
    "cat cgroup.type cgroup.events cgroup.freeze cgroup.max.depth cgroup.max.descendants",
    "cat cgroup.procs cgroup.threads",
    "grep -E '^nr_(dying_)?descendants' cgroup.stat",
    f"ls -la --time-style=+ | awk '{{print $1, $2, $3, $4, $5, $NF}}' | grep -E ' ({CORE_FILES}|\\.)$'",  # noqa: E501
    "stat -c '%s %b %B %h' cgroup.procs",
    "mkdir a && mkdir a",
    "mkdir \"$(printf 'x\\ny')\"",
    "cat a/cgroup.controllers a/cgroup.subtree_control a/cgroup.events",
    # junk and out-of-range writes
    "echo junk > cgroup.procs",
    "echo -1 > cgroup.procs",
    "echo '' > cgroup.procs",
    "echo '1 2' > cgroup.procs",
    "echo 99999999 > cgroup.procs",
    "echo 2147483648 > cgroup.procs",
    "echo 2 > a/cgroup.procs",
    "echo 2 > cgroup.freeze",
    "echo x > cgroup.freeze",
    "echo 0x0 > cgroup.freeze; cat cgroup.freeze",
    "echo 0 > cgroup.kill",
    "echo x > cgroup.kill",
    "echo '' > cgroup.kill",
    "echo domain > cgroup.type",
    "echo -1 > cgroup.max.depth",
    "echo 2147483648 > cgroup.max.depth",
    "echo abc > cgroup.max.descendants",
    "echo ' 0x10 ' > cgroup.max.depth; cat cgroup.max.depth; echo max > cgroup.max.depth",
    "echo +nosuch > cgroup.subtree_control",
    # trimmed with the kernel's isspace set: \034 stays (EINVAL), latin-1 NBSP goes
    "printf '+%s\\034' $C > cgroup.subtree_control; cat cgroup.subtree_control",
    "printf '+%s\\240' $C > cgroup.subtree_control; cat cgroup.subtree_control",
    "printf '\\013-%s\\014' $C > cgroup.subtree_control; cat cgroup.subtree_control",
    "echo $C > cgroup.subtree_control",
    'echo "+$C  -$C" > cgroup.subtree_control; cat cgroup.subtree_control',
    'echo "-$C +$C" > cgroup.subtree_control; cat cgroup.subtree_control',
    'echo "-$C" > cgroup.subtree_control; cat cgroup.subtree_control',
    "echo +$C > a/cgroup.subtree_control",
    "echo -$C > a/cgroup.subtree_control",
    "echo x > cgroup.controllers",
    "echo x > cgroup.events",
    "echo x > cgroup.stat",
    "cat cgroup.kill",
    # names that cannot be made or unmade
    "touch newfile",
    "rm -f cgroup.procs",
    "mv cgroup.procs p",
    "mv a b",
    "mkfifo fifo",
    "python3 -c \"import os; os.mknod('reg', 0o100644)\" 2>&1 | tail -1",
    "ln -s x link",
    "ln cgroup.procs hard",
    "rmdir cgroup.procs",
    "rmdir nosuch",
    "truncate -s 0 cgroup.procs && echo truncated",
    # hierarchy limits
    "echo 1 > cgroup.max.depth; mkdir a/b; echo max > cgroup.max.depth",
    "echo 1 > cgroup.max.descendants; mkdir c; echo max > cgroup.max.descendants",
    "mkdir a/b && rmdir a; rmdir a/b",
    # enabling a controller where a grandchild cgroup has one of its file names: EEXIST
    # (kernfs_add_one), and nothing enabled
    "echo +$C > cgroup.subtree_control; F=$(cd a && ls -d $C.* | tail -1); "
    "echo -$C > cgroup.subtree_control; mkdir a/$F && echo +$C > cgroup.subtree_control; "
    "cat cgroup.subtree_control; rmdir a/$F",
    # a process
    "echo $S > a/cgroup.procs && cat a/cgroup.procs a/cgroup.events",
    "cat cgroup.events",
    "rmdir a",
    "echo $S > a/cgroup.threads && echo same-cgroup",
    "echo 0 > a/cgroup.threads",
    "echo +$C > cgroup.subtree_control && cat cgroup.subtree_control a/cgroup.controllers",
    "echo +$C > a/cgroup.subtree_control",
    "mkdir d && echo +$C > d/cgroup.subtree_control && echo $S > d/cgroup.procs",
    "echo -$C > cgroup.subtree_control",
    "echo $S > cgroup.procs",
    "echo -$C > d/cgroup.subtree_control && rmdir d && echo -$C > cgroup.subtree_control",
    f"echo 1 > a/cgroup.freeze; {WAIT_FROZEN}; cat a/cgroup.freeze a/cgroup.events",
    "echo 0 > a/cgroup.freeze; cat a/cgroup.events",
    f"echo 1 > a/cgroup.kill; {WAIT_EMPTY}; cat a/cgroup.events a/cgroup.procs",
    "rmdir a && echo removed && ls -d a",
    "grep -E '^nr_descendants' cgroup.stat",
]


def _kernel_hierarchy() -> str | None:
    """The writable cgroup2 hierarchy's controller to use as $C, or None to skip."""
    try:
        with open("/proc/self/mounts") as f:
            if not any(line.split()[1:3] == [str(REAL), "cgroup2"] for line in f):
                return None
        controllers = read(REAL / "cgroup.controllers").split()
        probe = REAL / f"epcfs-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return None
    return controllers[0] if controllers else None


class Side:
    def __init__(self, root: Path, controller: str) -> None:
        self.root = root
        self.controller = controller
        self.base = root / f"epcfs-diff-{os.getpid()}"
        self.enabled_at_root = False

    def setup(self) -> None:
        if self.controller not in read(self.root / "cgroup.subtree_control").split():
            (self.root / "cgroup.subtree_control").write_text(f"+{self.controller}")
            self.enabled_at_root = True
        self.base.mkdir()
        self.sleeper = subprocess.Popen(["sleep", "60"])

    def run(self, step: str) -> tuple[int, str, str]:
        r = bash(step, cwd=self.base, env={"S": str(self.sleeper.pid), "C": self.controller})
        normalize = lambda s: re.sub(rf"\b{self.sleeper.pid}\b", "$S",  # noqa: E731
                                     re.sub(rf"\b{self.controller}\b", "C", s))
        return r.rc, normalize(r.out), normalize(r.err)

    def teardown(self) -> None:
        self.sleeper.kill()
        self.sleeper.wait()
        with contextlib.suppress(OSError, AssertionError):
            remove_tree(self.base)
        if self.enabled_at_root:
            with contextlib.suppress(OSError):
                (self.root / "cgroup.subtree_control").write_text(f"-{self.controller}")


def test_same_session_same_results(mount_epcfs):
    controller = _kernel_hierarchy()
    if controller is None:
        pytest.skip(f"no writable cgroup2 hierarchy with a controller at {REAL}")
    kernel = Side(REAL, controller)
    epcfs = Side(mount_epcfs("--root-controllers", "", "--file-size", "zero").path, "misc")
    try:
        kernel.setup()
        epcfs.setup()
        mismatches = []
        for step in SCRIPT:
            want, got = kernel.run(step), epcfs.run(step)
            if want != got:
                mismatches.append(f"$ {step}\n  kernel: {want}\n  epcfs:  {got}")
        assert not mismatches, "\n".join(mismatches)
        wait_for(lambda: kernel.sleeper.poll() is not None, TIMEOUT, "the kernel's cgroup.kill")
    finally:
        kernel.teardown()
        epcfs.teardown()
    assert not kernel.base.exists()
