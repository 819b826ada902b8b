"""Who made a request of the filesystem: the process behind a FUSE request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Caller:
    """Who opened the file: the FUSE request context at open (pid is the opening thread's
    id). One per open file, so `state` is per-fd state like the kernel's of->priv
    (memory.peak's reset watermark)."""

    pid: int
    uid: int
    gid: int
    state: dict = field(default_factory=dict)
