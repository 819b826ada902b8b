"""Delegation to a user namespace: a container whose root is mapped to an unprivileged
uid on the host uses the cgroup delegated to that uid exactly as the kernel allows —
inside the subtree it may create cgroups, move its processes, enable controllers and set
its children's limits; the delegated cgroup's own limits and everything outside stay
out of reach. FUSE sees the mapped host uid (allow_other lets it in at all,
default_permissions applies the file modes)."""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest

CLONE_NEWUSER = 0x10000000
DELEGATEE = 65534
"""The host uid the namespace's root maps to (nobody)."""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write uid maps")


def run_in_userns(script: str, cwd: str, cgroup: str) -> subprocess.CompletedProcess:
    """`sh -c script` in `cwd` as root of a new user namespace mapped to DELEGATEE,
    placed in `cgroup` by the host before it starts (as a container manager does).
    The directory is entered before the namespace: pytest's temporary directories are
    closed to other users, as a container's view of the host would be."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs
        try:
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.chdir(cwd)
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
                os._exit(90)
            os.write(ready_w, b"x")
            os.read(go_r, 1)
            os.setgid(0)
            os.setuid(0)
            os.execvp("sh", ["sh", "-c", script])
        finally:
            os._exit(91)
    os.close(out_w)
    os.read(ready_r, 1)
    for name, text in (("uid_map", f"0 {DELEGATEE} 1\n"), ("setgroups", "deny\n"),
                       ("gid_map", f"0 {DELEGATEE} 1\n")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(pid))
    os.write(go_w, b"x")
    with os.fdopen(out_r) as out:
        output = out.read()
    _, status = os.waitpid(pid, 0)
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)
    return subprocess.CompletedProcess(script, os.waitstatus_to_exitcode(status), output)


def test_a_user_namespace_uses_its_delegated_cgroup_as_the_kernel_allows(mount_epcfs):
    root = mount_epcfs("--time-scale", "0").path
    deleg = root / "deleg"
    deleg.mkdir()
    for path in (deleg, deleg / "cgroup.procs", deleg / "cgroup.subtree_control"):
        os.chown(path, DELEGATEE, DELEGATEE)
    result = run_in_userns("""
        d=deleg
        echo "uid $(id -u)"
        mkdir $d/child && echo "mkdir ok"
        echo 0 > $d/child/cgroup.procs && echo "moved: $(tr '\\n' ' ' < $d/child/cgroup.procs)"
        echo +misc > $d/cgroup.subtree_control && echo "enabled misc"
        echo "sgx_epc 8192" > $d/child/misc.max && echo "child limit: $(cat $d/child/misc.max)"
        echo "sgx_epc 4096" > $d/misc.max 2>/dev/null || echo "own limit refused"
        echo 0 > cgroup.procs 2>/dev/null || echo "escape refused"
        mkdir elsewhere 2>/dev/null || echo "mkdir outside refused"
    """, str(root), str(deleg))
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    assert lines[0] == "uid 0"
    assert "mkdir ok" in lines and "enabled misc" in lines
    moved = next(line for line in lines if line.startswith("moved:"))
    assert len(moved.split()) >= 2  # the shell (and its tr) now in the child
    assert "child limit: sgx_epc 8192" in lines
    assert {"own limit refused", "escape refused", "mkdir outside refused"} <= set(lines)
    assert os.stat(deleg / "child").st_uid == DELEGATEE
    assert (deleg / "misc.max").read_text() == "sgx_epc max\n"
    assert not (root / "elsewhere").exists()
