"""epcfs with a real container engine: podman, with crun and with runc.

The simulated SGX is a CDI device (`epcfs cdi`): `podman run --device epcfs.io/sgx=epc`
gives the container the enclave socket and runs `epcfs oci-hook`, which gives it a
cgroup of its own under the daemon's `containers/`, seen as its /sys/fs/cgroup, with
limits from the `epcfs.io/misc.max` and `epcfs.io/memory.max` annotations.

Each test starts its own daemon at a temporary mountpoint and runs podman inside a
private mount namespace (`unshare --mount --propagation private`, held by a sleeping
process and entered with nsenter), where:
- a tmpfs hides /run, so the spec written to /run/cdi is this test's only, and the
  runtimes' state (/run/crun, /run/runc) goes with the namespace;
- the name-less cgroup2 at /sys/fs/cgroup/unified is unmounted: on this kind of hybrid
  host it has a controller (hugetlb), and crun then refuses to run ("cgroups in hybrid
  mode not supported") even with --cgroups=disabled.
Podman's storage, run state and temporary files are private to the module (vfs driver,
no network). crun runs with --cgroups=disabled; runc needs cgroups (podman refuses
--cgroups=disabled with it), so it gets real v1 cgroups under a parent of the test's own,
removed afterwards. The runtimes keep their real cgroups; epcfs is what the container
sees. Every test removes its containers, its namespace and its host cgroups, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epcfs.tools.run import _python_paths
from tests.fs.util import read, remove_tree, wait_for

REPO = Path(__file__).resolve().parents[2]
EPCFS = [sys.executable, "-m", "epcfs.cli"]
IMAGE = "localhost/epcfs-busybox"
RUNTIMES = ("crun", "runc")
CDI_DIR = Path("/run/cdi")

CAPACITY = "32M"
"""Room for two containers' enclaves at once, small enough for a quick daemon."""

ULIMITS = '["nofile=4096:4096", "nproc=4096:4096"]'
"""Podman asks the runtime to raise RLIMIT_NOFILE and RLIMIT_NPROC to its defaults,
which root without CAP_SYS_RESOURCE (this sandbox) may not; lowering is always allowed."""

PODMAN_TIMEOUT = 120.0
"""Seconds one podman command may take on a loaded two-core machine."""

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Podman configuration and storage of this module's own, holding the busybox image
    built by scripts/make-rootfs (`podman import`, no registry)."""
    d = tmp_path_factory.mktemp("podman")
    (d / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{d}/root"\nrunroot = "{d}/runroot"\n')
    (d / "containers.conf").write_text(
        f'[containers]\nnetns = "none"\ndefault_ulimits = {ULIMITS}\n'
        f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n'
        f'tmp_dir = "{d}/tmp"\n')
    rootfs = d / "rootfs"
    subprocess.run([str(REPO / "scripts" / "make-rootfs"), str(rootfs)], check=True,
                   capture_output=True, timeout=120)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", IMAGE], stdin=tar.stdout, env=_env(d),
                   check=True, capture_output=True, timeout=PODMAN_TIMEOUT)
    tar.wait()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(store: Path) -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=str(store / "containers.conf"),
                CONTAINERS_STORAGE_CONF=str(store / "storage.conf"))


class Podman:
    """podman with one runtime, run in a private mount namespace that also sees one
    epcfs daemon (`cgroupfs`) and whose /run/cdi holds that daemon's spec."""

    def __init__(self, runtime: str, store: Path, cgroupfs: Path, socket: Path,
                 workdir: Path) -> None:
        self.runtime = runtime
        self.store = store
        self.cgroupfs = cgroupfs
        self.socket = socket
        self.workdir = workdir
        self.parent = f"epcfs-test-{os.getpid()}-{workdir.name}"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mountpoint -q /sys/fs/cgroup/unified && umount -l /sys/fs/cgroup/unified;"
             " mount -t tmpfs -o mode=755 run /run && mkdir /run/cdi"
             " && echo ready && exec sleep 100000"],
            stdout=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        assert line.strip() == "ready", "the test's mount namespace did not come up"
        spec = subprocess.run([*EPCFS, "cdi", "--mountpoint", str(cgroupfs),
                               "--enclave-socket", str(socket)], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        Path(f"/proc/{self.holder.pid}/root{CDI_DIR}/epcfs.json").write_text(spec)

    def __call__(self, *args: str, globals_: tuple[str, ...] = (),
                 timeout: float = PODMAN_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "podman",
             "--runtime", self.runtime, *globals_, *args],
            env=_env(self.store), capture_output=True, text=True, timeout=timeout)

    def cgroup_flags(self) -> list[str]:
        if self.runtime == "runc":
            return [f"--cgroup-parent=/{self.parent}"]
        return ["--cgroups=disabled"]

    def run(self, *args: str, device: bool = True, **kw) -> subprocess.CompletedProcess:
        """`podman run` with the epcfs device; `args` are run's options, IMAGE and CMD."""
        dev = ["--device", "epcfs.io/sgx=epc"] if device else []
        return self("run", *self.cgroup_flags(), *dev, *args, **kw)

    def containers(self) -> list[str]:
        """The container cgroups under the daemon's containers/ parent."""
        parent = self.cgroupfs / "containers"
        return sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.exists() else []

    def close(self) -> list[str]:
        """Remove every container, the namespace and the runc cgroups; returns the
        container cgroups that were still there once the containers were gone."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self("rm", "-a", "-f", "-t", "0")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.containers(), what="container cgroups removed")
        left = self.containers()
        self.holder.kill()
        self.holder.wait()
        self.holder.stdout.close()
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            # runc's cgroups and conmon's, which may take a moment to exit
            remove_tree(hierarchy / self.parent)
        return left


@pytest.fixture(params=RUNTIMES)
def podman(request, store, mount_epcfs, tmp_path) -> Podman:
    socket = tmp_path / "sgx.sock"
    daemon = mount_epcfs("--capacity", CAPACITY, "--time-scale", "0",
                         "--enclave-socket", str(socket))
    p = Podman(request.param, store, daemon.path, socket, tmp_path)
    try:
        yield p
    finally:
        left = p.close()
    assert not left, f"container cgroups left behind: {left}"


def python_binds() -> list[str]:
    """This interpreter, its venv and the epcfs sources read-only at their own paths, as
    `epcfs run --python` binds them (/bin is busybox)."""
    return [arg for path in _python_paths() for arg in ("-v", f"{path}:{path}:ro")]


def load(size: str, extra: str = "") -> str:
    """Shell lines: `epcfs load` in the background, waiting until it holds its enclave."""
    return (f"{sys.executable} -m epcfs.cli load --size {size} --hold 120 > /tmp/load 2>&1 &"
            " until grep -q holds /tmp/load; do kill -0 $! || { cat /tmp/load; exit 9; };"
            f" sleep 0.05; done; {extra}")


def misc_current(cg: Path) -> int:
    return int(read(cg / "misc.current").split()[1])


def test_the_annotation_is_the_limit_the_container_reads(podman):
    result = podman.run("--rm", "--annotation", "epcfs.io/misc.max=sgx_epc 4194304",
                        IMAGE, "cat", "/sys/fs/cgroup/misc.max")
    assert (result.returncode, result.stdout) == (0, "sgx_epc 4194304\n"), result.stderr


def test_the_container_sees_its_cgroup_as_the_root(podman):
    script = ("echo self $$; echo procs $(cat /sys/fs/cgroup/cgroup.procs);"
              " cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/misc.current;"
              " echo sock $EPCFS_SOCKET; test -S $EPCFS_SOCKET && echo socket;"
              " echo 'sgx_epc 0' > /sys/fs/cgroup/misc.max 2>/dev/null || echo read-only;"
              " ls /sys/fs/cgroup | grep -c subtree_control")
    result = podman.run("--rm", "--annotation", "epcfs.io/memory.max=67108864",
                        IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    procs = out[1].split()[1:]
    assert out[0] == "self 1" and "1" in procs and len(procs) == 2, out
    assert out[2:] == ["67108864", "sgx_epc 0", "sock /run/epcfs/sgx_enclave", "socket",
                       "read-only", "1"]


def test_a_bad_annotation_fails_the_start_with_the_errno_and_leaves_nothing(podman):
    result = podman.run("--rm", "--annotation", "epcfs.io/misc.max=sgx_epc lots",
                        IMAGE, "true")
    assert result.returncode != 0
    # runc shows the hook's stderr; crun only its exit status, which is the errno
    expected = "exit code: 22" if podman.runtime == "crun" else "Invalid argument"
    assert expected in result.stderr, result.stderr
    assert podman.containers() == []
    assert podman("ps", "-a", "-q").stdout == ""


def test_two_containers_are_charged_separately_and_kill_and_rm_leave_nothing(podman):
    ids = {}
    for size in ("4M", "8M"):
        result = podman.run("-d", *python_binds(), IMAGE, "sh", "-c",
                            load(size, "echo held > /tmp/held; exec sleep 120"))
        assert result.returncode == 0, result.stderr
        ids[size] = result.stdout.strip()
    parent = podman.cgroupfs / "containers"
    cg = {size: parent / cid for size, cid in ids.items()}
    # each holds its heap plus the enclave's own pages (SECS, TCS, VA)
    wait_for(lambda: misc_current(cg["4M"]) > 4 << 20 and misc_current(cg["8M"]) > 8 << 20,
             timeout=60, what="both enclaves charged")
    charges = {size: misc_current(c) for size, c in cg.items()}
    assert charges["4M"] < 8 << 20 and misc_current(parent) == sum(charges.values())
    assert podman("kill", ids["4M"]).returncode == 0
    wait_for(lambda: not cg["4M"].exists(), timeout=30, what="the killed container's cgroup gone")
    assert misc_current(parent) == charges["8M"]
    assert podman("rm", "-f", ids["8M"]).returncode == 0
    wait_for(lambda: not cg["8M"].exists(), timeout=30, what="the removed container's cgroup gone")
    assert misc_current(parent) == 0


def test_an_enclave_over_the_limit_is_reclaimed_to_it(podman):
    script = load("16M", "cat /sys/fs/cgroup/misc.current /sys/fs/cgroup/misc.events;"
                         " kill $!; wait $!")
    result = podman.run("--rm", "--annotation", "epcfs.io/misc.max=sgx_epc 4194304",
                        *python_binds(), IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    current, events = result.stdout.splitlines()[:2]
    assert 0 < int(current.split()[1]) <= 4194304, current
    assert events.startswith("sgx_epc.max ") and int(events.split()[1]) > 0, events
    assert misc_current(podman.cgroupfs) == 0


def test_memory_max_too_small_for_the_backing_store_oom_kills(podman):
    # the load is the container's init: the OOM killer's SIGKILL is the container's end
    result = podman.run("--rm", "--annotation", "epcfs.io/misc.max=sgx_epc 4194304",
                        "--annotation", "epcfs.io/memory.max=1048576", *python_binds(),
                        IMAGE, sys.executable, "-m", "epcfs.cli", "load", "--size", "16M",
                        "--hold", "0")
    assert result.returncode == 128 + 9, result.stdout + result.stderr
    events = dict(line.split() for line in read(podman.cgroupfs / "containers" /
                                                "memory.events").splitlines())
    assert events["oom_kill"] == "1"
    assert misc_current(podman.cgroupfs) == 0


def test_double_forked_processes_stay_in_the_container_cgroup(podman):
    script = ("(sleep 100 &); sleep 101 & sleep 0.5;"
              " echo sleeps $(pidof sleep); echo procs $(cat /sys/fs/cgroup/cgroup.procs)")
    result = podman.run("--rm", IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    sleeps, procs = set(out["sleeps"].split()), set(out["procs"].split())
    assert len(sleeps) == 2 and sleeps <= procs, out


def test_a_hooks_d_file_does_it_without_cdi(podman, tmp_path):
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    hook = json.loads((REPO / "hooks.d" / "epcfs.json").read_text())
    hook["hook"]["path"] = sys.executable
    args = hook["hook"]["args"]
    args[:args.index("oci-hook")] = [sys.executable, "-m", "epcfs.cli"]
    args[args.index("--mountpoint") + 1] = str(podman.cgroupfs)
    (hooks / "epcfs.json").write_text(json.dumps(hook))
    flags = ("--hooks-dir", str(hooks))
    result = podman.run("--rm", "--annotation", "epcfs.io/misc.max=sgx_epc 8388608",
                        IMAGE, "cat", "/sys/fs/cgroup/misc.max", device=False, globals_=flags)
    assert (result.returncode, result.stdout) == (0, "sgx_epc 8388608\n"), result.stderr
    # without an epcfs.io/ annotation the hook does not run: no epcfs cgroup
    result = podman.run("--rm", IMAGE, "ls", "/sys/fs/cgroup", device=False, globals_=flags)
    assert result.returncode == 0 and "misc.max" not in result.stdout, result.stdout


def test_the_hook_refuses_what_is_not_an_oci_state(tmp_path):
    bad = ("", "garbage", "[]", '{"id": "../x", "pid": 1}', '{"id": "c1"}',
           '{"id": "c1", "pid": 1, "annotations": []}',
           '{"id": "c1", "pid": 1, "annotations": {"epcfs.io/misc.max": 5}}',
           '{"id": "c1", "pid": 1, "bundle": 7}',
           f'{{"id": "c1", "pid": 1, "bundle": "{tmp_path}"}}')
    for stdin in bad:
        result = subprocess.run([*EPCFS, "oci-hook", "--mountpoint", str(tmp_path)],
                                input=stdin, capture_output=True, text=True, cwd=REPO)
        assert result.returncode != 0 and result.stderr.startswith("epcfs oci-hook: "), stdin
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_poststop_of_a_container_without_cgroup_is_fine(tmp_path):
    state = json.dumps({"ociVersion": "1.0.2", "id": "c1", "status": "stopped"})
    result = subprocess.run([*EPCFS, "oci-hook", "--mountpoint", str(tmp_path)],
                            input=state, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr



def test_cdi_prints_a_spec_podman_4_3_reads_for_the_default_daemon():
    result = subprocess.run([*EPCFS, "cdi"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert (spec["cdiVersion"], spec["kind"]) == ("0.5.0", "epcfs.io/sgx")
    (device,) = spec["devices"]
    edits = device["containerEdits"]
    assert device["name"] == "epc" and edits["env"] == ["EPCFS_SOCKET=/run/epcfs/sgx_enclave"]
    assert edits["mounts"][0]["hostPath"] == "/run/epcfs/sockets/run-epcfs-cgroup.sock"
    assert [(h["hookName"], h["args"][-3:]) for h in edits["hooks"]] == [
        ("createRuntime", ["--mountpoint", "/run/epcfs/cgroup", "createRuntime"]),
        ("poststop", ["--mountpoint", "/run/epcfs/cgroup", "poststop"])]


def test_a_privileged_container_may_write_its_limits(podman):
    script = "echo 'sgx_epc 8192' > /sys/fs/cgroup/misc.max && cat /sys/fs/cgroup/misc.max"
    result = podman.run("--rm", "--privileged", IMAGE, "sh", "-c", script)
    assert (result.returncode, result.stdout) == (0, "sgx_epc 8192\n"), result.stderr
