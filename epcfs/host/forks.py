"""Fork events from the kernel's proc connector (linux/cn_proc.h, netlink)."""

from __future__ import annotations

import errno
import socket
import struct

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 0x00000001
_NLMSG_HDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HDR = struct.Struct("=IIQ")
_FORK = struct.Struct("=IIII")


class ForkEvents:
    """PROC_EVENT_FORK from the kernel's proc connector; `drain()` never blocks."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self.sock.bind((0, CN_IDX_PROC))
            op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
            cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
            self.sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), 3, 0, 0, 0) + cn)
        except OSError:
            self.sock.close()
            raise
        self.lost = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> list[tuple[int, int]]:
        """(parent tgid, child pid) for every new process since the last call."""
        out = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost = True
                    continue
                raise
            offset = 0
            while offset + _NLMSG_HDR.size <= len(data):
                length = _NLMSG_HDR.unpack_from(data, offset)[0]
                body = offset + _NLMSG_HDR.size + _CN_MSG.size
                if length < _NLMSG_HDR.size or body + _EVENT_HDR.size > len(data):
                    break
                what = _EVENT_HDR.unpack_from(data, body)[0]
                if what == PROC_EVENT_FORK:
                    _, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(
                        data, body + _EVENT_HDR.size)
                    if child_pid == child_tgid:
                        out.append((parent_tgid, child_pid))
                offset += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()
