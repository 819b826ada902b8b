"""Where `epcfs top` finds the daemons: one small file per daemon in DAEMONS_DIR.

Every daemon — `epcfs mount`, and the ones `epcfs run` and `epcfs selftest` start in
their private mount namespaces — writes `<pid>.json` there (its pid, mountpoint, enclave
socket and mount namespace) while it serves, and removes it when it stops. A private
mount namespace still shares /run's and /tmp's files with the host (it copies the
mounts, not the filesystems), so a reader in any namespace sees every entry and reaches
each daemon through its socket. A daemon killed with SIGKILL leaves its file behind:
readers skip entries whose pid is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

DAEMONS_DIR = "/run/epcfs/daemons"
"""Beside the default sockets in /run/epcfs: runtime state, gone at reboot."""


@dataclass
class Entry:
    pid: int
    mountpoint: str
    socket: str
    namespace: str
    """The daemon's mount namespace (`mnt:[inode]`): its mountpoint is a path there."""

    def command(self) -> str:
        """The epcfs command that started the daemon, e.g. `epcfs selftest …` (a detached
        daemon is a fork of the command that asked for it): from its first argument
        naming epcfs, without the interpreter and the program's directory."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().rstrip(b"\0").split(b"\0")]
        except OSError:
            return ""
        for i, arg in enumerate(argv):
            if arg == "epcfs.cli" or os.path.basename(arg) == "epcfs":
                return " ".join(["epcfs", *argv[i + 1:]])
        return " ".join(argv)


@contextlib.contextmanager
def registered(mountpoint: str, socket: str, directory: str = DAEMONS_DIR) -> Iterator[Entry]:
    """This process is a daemon serving `mountpoint` with its enclave `socket`, for the
    duration of the block."""
    entry = Entry(os.getpid(), mountpoint, os.path.abspath(socket),
                  os.readlink("/proc/self/ns/mnt"))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{entry.pid}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(entry), f)
    os.replace(path + ".tmp", path)  # readers never see half a file
    try:
        yield entry
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def daemons(directory: str = DAEMONS_DIR) -> list[Entry]:
    """The registered daemons that are still running, by pid."""
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                entry = Entry(**json.load(f))
            os.kill(entry.pid, 0)
        except (OSError, ValueError, TypeError):
            continue  # gone (a stale entry), being replaced, or not ours
        found.append(entry)
    return sorted(found, key=lambda e: e.pid)
