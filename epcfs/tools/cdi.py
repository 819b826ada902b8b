"""`epcfs cdi [--mountpoint M] [--enclave-socket S]`: the simulated SGX as a CDI device.

Prints a Container Device Interface spec (JSON) for the device `epcfs.io/sgx=epc` of
the daemon mounted at M. Saved in /etc/cdi or /var/run/cdi, `podman run --device
epcfs.io/sgx=epc …` gives the container the enclave socket at /run/epcfs/sgx_enclave
(named by $EPCFS_SOCKET) and runs `epcfs oci-hook` at createRuntime and poststop: the
container gets a cgroup of its own under M, seen as its /sys/fs/cgroup, with limits
from the annotations `epcfs.io/misc.max` and `epcfs.io/memory.max`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..protocol import default_socket
from .oci_hook import DEFAULT_MOUNTPOINT
from .run import CONTAINER_SOCKET

CDI_VERSION = "0.5.0"
"""Podman 4.3 (Debian 12) vendors CDI 0.5, whose parser refuses any later cdiVersion;
0.5.0 has everything used here (mounts, env, createRuntime and poststop hooks)."""

KIND = "epcfs.io/sgx"
DEVICE = "epc"

HOOK_STAGES = ("createRuntime", "poststop")
"""createRuntime: after the container's mounts are made and before pivot_root, in the
runtime's namespaces, where crun and runc both run it; poststop: once it is gone."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT, metavar="M",
                   help=f"where the epcfs daemon is mounted (default {DEFAULT_MOUNTPOINT})")
    p.add_argument("--enclave-socket", default=None, metavar="S",
                   help="the daemon's enclave socket (default: the daemon's default for M)")


def run(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    socket = os.path.abspath(args.enclave_socket or default_socket(mountpoint))
    json.dump(spec(mountpoint, socket), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def spec(mountpoint: str, socket: str) -> dict:
    """The CDI spec for the daemon at `mountpoint` listening on `socket`; the hooks run
    this interpreter, so they find the epcfs that printed the spec."""
    command = [sys.executable, "-m", "epcfs.cli", "oci-hook", "--mountpoint", mountpoint]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": [{
            "name": DEVICE,
            "containerEdits": {
                "env": [f"EPCFS_SOCKET={CONTAINER_SOCKET}"],
                "mounts": [{"hostPath": socket, "containerPath": CONTAINER_SOCKET,
                            "options": ["bind"]}],
                "hooks": [{"hookName": stage, "path": sys.executable,
                           "args": [*command, stage]} for stage in HOOK_STAGES],
            },
        }],
    }
