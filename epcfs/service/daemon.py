"""`epcfs mount`: the daemon. One trio nursery holds the FUSE loop and every service task.

Like other FUSE daemons (sshfs, s3ql's mount.s3ql), it detaches by default and the
command returns once the mount answers; -f/--foreground keeps it attached (systemd, tests).
Readiness is "a stat of misc.capacity through the mount succeeded": only then does the
parent return, or does systemd get READY=1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from ..host.membership import MODES as MEMBERSHIP_MODES
from ..model.cgroup import CONTROLLERS
from ..model.constants import SGX_MAX_EPC_SECTIONS
from ..protocol import default_socket, mount_key
from ..units import parse_nonnegative, parse_pages
from .timing import DEFAULT_SCALE

log = logging.getLogger("epcfs")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Each of these unmounts cleanly and exits 0."""

FILE_SIZES = ("auto", "zero", "content")
"""--file-size choices; see MountConfig.file_size."""

LOG_DIR = "/run/epcfs/log"
"""Where a detached daemon logs by default: beside the sockets (protocol.SOCKET_DIR),
out of any mountpoint, and gone at reboot with the mounts it describes."""

DEFAULT_CAPACITY = 128 << 20
"""128 MiB of EPC: what many SGX1 client parts shipped with, and quick to simulate."""


@dataclass
class MountConfig:
    mountpoint: str
    capacity: int = DEFAULT_CAPACITY
    sections: list[tuple[int, int]] | None = None
    """EPC sections as (NUMA node, bytes); None: one section of `capacity` on node 0."""
    time_scale: float = DEFAULT_SCALE
    """Wall seconds per simulated second of ENCLS work."""
    enclave_socket: str | None = None
    """Where the simulated /dev/sgx_enclave listens; None: protocol.default_socket."""
    root_controllers: str = "memory misc"
    """The root's cgroup.subtree_control at mount: a booted host's init system has
    enabled controllers there, and libcgroup (cgcreate) relies on it: it enables a
    controller in the cgroups it creates, never in the root."""
    file_size: str = "auto"
    """What st_size interface files report: "zero" as kernfs does; "content" (see
    CgroupFs.sized_files); "auto": "content" only if this kernel's FUSE splice needs it."""
    cgroup_version: int = 2
    """2: one cgroup2 hierarchy at the mountpoint. 1: the v1 layout, a read-only
    directory holding two hierarchies, `misc` and `memory` (root_controllers unused)."""
    trace: str | None = None
    """Where to write a Chrome trace-event file of the run (trace.ChromeTrace)."""
    membership: str = "auto"
    """Who tracks which process is in which cgroup (MEMBERSHIP_MODES): "cgroup",
    the kernel in a mirror of the tree; "events", fork events; "auto": cgroup if it can."""
    socket_mode: int | None = None
    """Permission bits added to the enclave socket's 0660 (group sgx) or 0600."""
    log_file: str | None = None
    """Where stderr (every log line) goes: from the start in the foreground, once mounted
    when detached. None: stays on stderr in the foreground, /dev/null when detached."""
    pidfile: str | None = None
    """A file holding the serving daemon's pid while it serves."""
    foreground: bool = False
    debug: bool = False
    fuse_debug: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="directory to mount on")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached to the terminal instead of detaching once mounted")
    p.add_argument("-d", "--debug", action="store_true", help="log every request (implies -f)")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="append log lines to FILE (default: stderr with -f, else "
                        f"{LOG_DIR}/<mountpoint with - for />.log)")
    p.add_argument("--pidfile", metavar="FILE", default=None,
                   help="write the daemon's pid to FILE while it serves")
    p.add_argument("--socket-mode", type=parse_mode, default=None, metavar="OCTAL",
                   help="permission bits added to the enclave socket's (default 0660 and "
                        "group sgx if that group exists, else 0600; 0666: any local user)")
    add_mount_options(p)


def add_mount_options(p: argparse.ArgumentParser) -> None:
    """What the simulated machine looks like; shared by mount, run and selftest."""
    p.add_argument("--capacity", type=parse_pages, default=None, metavar="SIZE",
                   help="total EPC size, with K/M/G suffix (default 128M), as one section "
                        "on node 0")
    p.add_argument("--epc-section", type=parse_section, action="append", default=None,
                   metavar="NODE:SIZE", dest="epc_sections",
                   help="an EPC section of SIZE bytes on NUMA node NODE (repeatable, at most "
                        "8); the capacity is their sum")
    p.add_argument("--time-scale", type=parse_nonnegative, default=None, metavar="X",
                   help=f"wall seconds per simulated second of SGX work (default "
                        f"{DEFAULT_SCALE:g}: the selftests' runs take realistic seconds at "
                        "128M; 0: as fast as possible)")
    p.add_argument("--root-controllers", type=parse_controllers, metavar="LIST", default=None,
                   help="controllers enabled in the root's cgroup.subtree_control at mount, "
                        "as a booted host's init system leaves them (default \"memory misc\"; "
                        "\"\" for a bare kernel mount; unused with --cgroup-version 1)")
    p.add_argument("--cgroup-version", type=int, choices=(1, 2), default=None,
                   help="2 (default): a cgroup2 hierarchy; 1: the cgroup v1 layout, separate "
                        "misc and memory hierarchies in MOUNTPOINT/misc and MOUNTPOINT/memory")
    p.add_argument("--file-size", choices=FILE_SIZES, default=None,
                   help="st_size of interface files: zero, as cgroupfs; content, the length "
                        "rounded up to a page, which kernels lacking the FUSE fix \"use "
                        "copy_splice_read() for FOPEN_DIRECT_IO\" need for sendfile readers "
                        "such as busybox cat; auto (default): content only on such a kernel")
    p.add_argument("--enclave-socket", metavar="PATH", default=None,
                   help="where the simulated /dev/sgx_enclave listens (default: "
                        "/run/epcfs/sockets/<mountpoint>.sock; clients use $EPCFS_SOCKET or that)")
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="write a Chrome trace-event file (ui.perfetto.dev, chrome://tracing) "
                        "of EPC use, reclaim and failures per cgroup, as it happens")
    p.add_argument("--membership", choices=MEMBERSHIP_MODES, default=None,
                   help="cgroup: the kernel tracks processes, in real cgroups mirroring "
                        "the tree below the daemon's own cgroup2 cgroup (v1 layout: in named "
                        "v1 hierarchies); events: the proc connector's fork events do; auto "
                        "(default): cgroup where it works")


def parse_controllers(text: str) -> str:
    """A space-separated list of controller names epcfs has (memory, misc), or ""."""
    unknown = [name for name in text.split(" ") if name and name not in CONTROLLERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"no such controller: {unknown[0]!r} (epcfs has {' '.join(CONTROLLERS)})")
    return text


def parse_mode(text: str) -> int:
    """`0666` -> 0o666: permission bits, octal, no file type or setuid bits."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0666)")
    return mode


def parse_section(text: str) -> tuple[int, int]:
    """`NODE:SIZE` -> (node, bytes): a whole number of 4 KiB pages, at least one."""
    node, colon, size = text.partition(":")
    if not colon or not (node.isascii() and node.isdigit()):
        raise argparse.ArgumentTypeError(f"not NODE:SIZE: {text!r} (e.g. 0:64M)")
    return int(node), parse_pages(size)


def _capacity(args: argparse.Namespace) -> tuple[int, list[tuple[int, int]] | None]:
    sections = getattr(args, "epc_sections", None)
    capacity = getattr(args, "capacity", None)
    if not sections:
        return (DEFAULT_CAPACITY if capacity is None else capacity), None
    if len(sections) > SGX_MAX_EPC_SECTIONS:
        raise SystemExit(f"epcfs: at most {SGX_MAX_EPC_SECTIONS} --epc-section options")
    total = sum(size for _, size in sections)
    if capacity is not None and capacity != total:
        raise SystemExit(f"epcfs: --capacity {capacity} disagrees with the --epc-section "
                         f"total {total}")
    return total, sections


def config_from_args(args: argparse.Namespace, mountpoint: str) -> MountConfig:
    capacity, sections = _capacity(args)
    scale = getattr(args, "time_scale", None)
    return MountConfig(
        mountpoint=os.path.abspath(mountpoint),
        capacity=capacity,
        sections=sections,
        time_scale=MountConfig.time_scale if scale is None else scale,
        enclave_socket=getattr(args, "enclave_socket", None),
        root_controllers=(MountConfig.root_controllers
                          if getattr(args, "root_controllers", None) is None
                          else args.root_controllers),
        cgroup_version=getattr(args, "cgroup_version", None) or 2,
        file_size=getattr(args, "file_size", None) or MountConfig.file_size,
        trace=os.path.abspath(args.trace) if getattr(args, "trace", None) else None,
        membership=getattr(args, "membership", None) or MountConfig.membership,
        foreground=getattr(args, "foreground", False) or getattr(args, "debug", False),
        debug=getattr(args, "debug", False),
        socket_mode=getattr(args, "socket_mode", None),
        log_file=getattr(args, "log", None),
        pidfile=getattr(args, "pidfile", None),
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, args.mountpoint)
    logging.basicConfig(
        level=logging.DEBUG if cfg.debug else logging.INFO,
        format="epcfs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # A stale mount fails stat() once the kernel's attribute cache expires: lift it first.
    with contextlib.suppress(OSError):
        clear_stale_mount(cfg.mountpoint)
    problem = mountpoint_problem(cfg)
    if problem:
        print(f"epcfs: {problem}", file=sys.stderr)
        return 1
    if cfg.foreground:
        clear_stale_mount(cfg.mountpoint)
        if cfg.log_file:
            redirect_stderr(cfg.log_file)
        return serve(cfg, ready=lambda: notify_systemd("READY=1", "STATUS=serving"))
    if cfg.log_file is None:
        cfg.log_file = default_log(cfg.mountpoint)
    try:
        start_detached(cfg)
    except RuntimeError as e:
        print(f"epcfs: {e}", file=sys.stderr)
        return 1
    return 0


def mountpoint_problem(cfg: MountConfig) -> str | None:
    """Why epcfs must not mount at cfg.mountpoint, in one line; None if it may."""
    if not os.path.exists(cfg.mountpoint):
        return f"{cfg.mountpoint}: No such file or directory"
    if not os.path.isdir(cfg.mountpoint):
        return f"{cfg.mountpoint}: Not a directory"
    if live_epcfs_at(cfg.mountpoint):
        return (f"{cfg.mountpoint}: a live epcfs daemon already serves it (stop that one "
                "first; a second one would hide it)")
    socket_path = cfg.enclave_socket or default_socket(cfg.mountpoint)
    inside = os.path.commonpath([cfg.mountpoint, os.path.abspath(socket_path)])
    if inside == cfg.mountpoint:
        return (f"the enclave socket {socket_path} would lie inside the mountpoint "
                f"{cfg.mountpoint}: choose another --enclave-socket or mountpoint")
    return None


def live_epcfs_at(mountpoint: str) -> bool:
    """Whether an epcfs mount sits at `mountpoint` (a stale one is cleared before this
    is asked, so one that is listed is served)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields, _, tail = line.partition(b" - ")
            point = fields.split()[4].decode("unicode_escape").encode("latin-1")
            if point == target and tail.split()[0] == b"fuse.epcfs":
                return True
    return False


def default_log(mountpoint: str) -> str:
    """Where a detached daemon logs unless told: beside the sockets, never in a mount."""
    return os.path.join(LOG_DIR, f"{mount_key(mountpoint)}.log")


def redirect_stderr(path: str) -> None:
    """Send fd 2 (log lines, and any traceback) to the end of `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    os.dup2(fd, 2)
    os.close(fd)


def clear_stale_mount(mountpoint: str) -> None:
    """A daemon killed with SIGKILL leaves a mount that answers ENOTCONN: lift it first.

    statvfs, not stat: the kernel may answer stat from its attribute cache even after the
    connection died, while statfs always reaches the (dead) daemon.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        # ECONNABORTED: the connection was aborted while a thread of the dead daemon
        # still held /dev/fuse; either way nobody will answer this mount again.
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
        log.info("clearing stale mount at %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)


def start_detached(cfg: MountConfig) -> int:
    """Fork a daemon and return its pid once the mount answers.

    The child detaches (new session, stdio on /dev/null once ready) and serves until
    SIGTERM; the caller learns of a failed start as RuntimeError with the exit status.
    """
    clear_stale_mount(cfg.mountpoint)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            ok = r.read(1) == b"1"
        if not ok:
            _, status = os.waitpid(pid, 0)
            raise RuntimeError(f"daemon exited with status {os.waitstatus_to_exitcode(status)}")
        return pid
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)

    def ready() -> None:
        os.write(wfd, b"1")
        os.close(wfd)
        if cfg.log_file:
            redirect_stderr(cfg.log_file)
        elif not cfg.debug:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    os._exit(serve(cfg, ready))


def notify_systemd(*fields: str) -> None:
    """sd_notify(`fields`, MAINPID) when started by systemd with Type=notify (READY=1,
    STOPPING=1, STATUS=…); a no-op otherwise, and never an error: systemd may be gone."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            s.sendall("\n".join([*fields, f"MAINPID={os.getpid()}", ""]).encode())
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e.strerror)


def serve(cfg: MountConfig, ready) -> int:
    """Mount, run every task until SIGTERM/SIGINT or an unmount, then unmount cleanly."""
    from .enclave_socket import EnclaveSocket, SocketBusy

    # The socket is bound before the mount exists: nothing the daemon does may touch its
    # own mount before the FUSE loop serves it, or it waits on itself in the kernel. And
    # first of all: a second daemon for the same socket leaves before it makes anything.
    enclave_socket = EnclaveSocket(
        os.path.abspath(cfg.enclave_socket or default_socket(cfg.mountpoint)), cfg.socket_mode)
    try:
        listening = enclave_socket.open()
    except (SocketBusy, OSError) as e:
        log.error("cannot listen on the enclave socket: %s", e)
        return 1
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(pidfile(cfg.pidfile))
            except OSError as e:
                log.error("--pidfile %s: %s", cfg.pidfile, e.strerror)
                return 1
            return _build_and_serve(cfg, ready, listening)
    finally:
        enclave_socket.close()


def _build_and_serve(cfg: MountConfig, ready, listening) -> int:
    """The simulated machine and its trackers, then _serve."""
    from ..fs.cftype import Context
    from ..fs.ops import CgroupFs
    from ..host.membership import LegacyTrackers, open_tracker
    from ..model.cgroup import Hierarchy
    from ..model.sgx import Sgx
    from .enclave_server import EnclaveServer
    from .reclaimers import Reclaimers
    from .steps import Stepper
    from .trace import ChromeTrace

    if cfg.cgroup_version == 1:
        hierarchy = Hierarchy(legacy="misc")
        hierarchy.mem = Hierarchy(legacy="memory")
    else:
        hierarchy = Hierarchy()
        hierarchy.write_subtree_control(
            hierarchy.root, " ".join("+" + name for name in cfg.root_controllers.split()))
    sections = cfg.sections or [(0, cfg.capacity)]
    # Before the trackers: a tracker may make real cgroups, which a failed start must
    # not leave behind.
    try:
        tracer = ChromeTrace(cfg.trace) if cfg.trace else None
    except OSError as e:
        log.error("--trace %s: %s", cfg.trace, e.strerror)
        return 1
    sgx = Sgx(hierarchy, sections)
    # The machine booted long before anyone could look: ksgxd's EREMOVE pass over every
    # EPC page is done before the mount answers (its time is not spent; a selftest run
    # right after mounting must not meet a half-sanitized EPC and fail with ENOMEM).
    sgx.sanitize_all()
    hierarchies = (hierarchy, hierarchy.mem) if cfg.cgroup_version == 1 else (hierarchy,)
    trackers: list = []
    try:
        for h in hierarchies:
            trackers.append(open_tracker(h, cfg.membership))
    except OSError as e:
        log.error("--membership %s: %s", cfg.membership, e)
        for made in trackers:  # a v1 layout's first mirror is real already
            made.close()
        if tracer is not None:
            tracer.close()
        return 1
    contexts = tuple(Context(h, t) for h, t in zip(hierarchies, trackers, strict=True))
    if cfg.cgroup_version == 1:
        tracker = LegacyTrackers(*trackers)
        fs = CgroupFs(contexts[0], v1=contexts)
    else:
        tracker = trackers[0]
        fs = CgroupFs(contexts[0])
    fs.sized_files = cfg.file_size == "content"
    steps = Stepper(sgx, tracker, cfg.time_scale)
    if tracer is not None:
        steps.tracer = tracer
        if cfg.cgroup_version == 2:  # v1 has no cgroup.kill
            tracker.kill_hooks.append(tracer.killed)
    reclaimers = Reclaimers(sgx, steps)
    server = EnclaveServer(sgx, tracker, sections, steps)
    return _serve(cfg, ready, fs, tracker, reclaimers, server, listening)


@contextlib.contextmanager
def pidfile(path: str | None):
    """`path` holds our pid while the block runs (nothing if None)."""
    if path is None:
        yield
        return
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _serve(cfg: MountConfig, ready, fs, tracker, reclaimers, server, listening) -> int:
    """Mount and run the trio loop until stopped; unmount."""
    import pyfuse3
    import trio

    from ..fs import loop as fuse_loop
    from .registry import registered

    options = set(pyfuse3.default_options)
    options |= {"fsname=epcfs", "subtype=epcfs", "allow_other"}
    if cfg.fuse_debug:
        options.add("debug")
    try:
        pyfuse3.init(fs, cfg.mountpoint, options)
    except RuntimeError as e:  # fuse_session_mount failed; libfuse said why on stderr
        log.error("cannot mount at %s: %s", cfg.mountpoint, e)
        tracker.close()
        return 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, nursery)
            nursery.start_soon(tracker.run)
            nursery.start_soon(reclaimers.run)
            nursery.start_soon(server.steps.tracer.run, server.sgx)
            await nursery.start(server.serve, listening)
            nursery.start_soon(_announce_ready, capacity_file(cfg), ready,
                               fs if cfg.file_size == "auto" else None)
            with registered(cfg.mountpoint, listening.getsockname()):
                await fuse_loop.main()
            nursery.cancel_scope.cancel()

    async def _signals(nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                notify_systemd("STOPPING=1", f"STATUS=unmounting (signal {signum})")
                pyfuse3.terminate()

    status = 0
    try:
        trio.run(main)
    except BaseException:
        log.exception("daemon failed")
        status = 1
    finally:
        # A second SIGTERM (systemd, `timeout`, an impatient user) must not kill us
        # between leaving the loop and unmounting: that would leave a dead mount.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        pyfuse3.close(unmount=True)
        tracker.close()
        server.steps.tracer.close()
    return status


def capacity_file(cfg: MountConfig) -> str:
    """misc.capacity under the mount: the readiness probe (v1: in the misc hierarchy)."""
    misc_root = os.path.join(cfg.mountpoint, "misc") if cfg.cgroup_version == 1 else cfg.mountpoint
    return os.path.join(misc_root, "misc.capacity")


async def _announce_ready(path: str, ready, autosize) -> None:
    """Once `path` answers: with --file-size auto (`autosize`, the CgroupFs), size files
    if this kernel needs it, before anyone else reads them; then report ready."""
    import trio

    try:
        await trio.to_thread.run_sync(os.stat, path)
        sized = autosize is not None and await trio.to_thread.run_sync(
            splice_stops_at_size, path)
    except OSError as e:  # unmounted at once (fusermount3 -u): the FUSE loop ends too
        log.info("the mount went away before it was ready: %s", e)
        return
    if sized:
        log.info("this kernel's FUSE splices direct-I/O files only up to their size: "
                 "reporting file sizes (--file-size content)")
        await autosize.size_files()
    ready()


def splice_stops_at_size(path: str) -> bool:
    """Whether splice (what sendfile uses) of the non-empty, size-0 file `path` comes back
    empty although read() does not: FUSE serving it from the page cache up to i_size."""
    with open(path, "rb", buffering=0) as f:
        expected = f.read()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        spliced = os.splice(fd, w, max(len(expected), 1))
    except OSError:
        return False  # no splice here: sendfile users fall back to read()
    finally:
        for f in (fd, r, w):
            os.close(f)
    return spliced == 0 and bool(expected)
