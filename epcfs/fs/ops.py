"""pyfuse3 Operations serving the hierarchy through the interface-file tables.

Nothing here knows any single file: a directory is a cgroup, a file is a (cgroup, CfType)
pair, and its contents are whatever the row's show() renders. Contents are rendered at
open into a per-handle snapshot, so chunked reads are consistent, and files are
direct_io so no stale page cache survives a change.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3

from ..model.cgroup import Cgroup
from .cftype import CfType, Context
from .misc_files import MISC_FILES

log = logging.getLogger(__name__)

TABLES: tuple[tuple[CfType, ...], ...] = (MISC_FILES,)
"""Every controller's file table; a cgroup directory lists the rows that admit it."""

ENTRY_TIMEOUT = 1.0
"""Seconds the kernel may cache a name → inode; changes we make are invalidated explicitly."""

DIR_MODE = stat.S_IFDIR | 0o755


@dataclass
class Node:
    """An inode: a cgroup directory (cftype None) or one of its interface files."""

    inode: int
    cgroup: Cgroup
    cftype: CfType | None
    mode: int
    uid: int = 0
    gid: int = 0
    stamp: int = field(default_factory=time.time_ns)


class CgroupFs(pyfuse3.Operations):
    """The filesystem. `ctx` carries the model the rows read and write."""

    enable_writeback_cache = False

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[tuple[int, str | None], Node] = {}
        self.next_inode = pyfuse3.ROOT_INODE
        self.handles: dict[int, bytes] = {}
        self.next_fh = 1
        self._node(ctx.hierarchy.root, None)

    # -- inode registry ------------------------------------------------------------

    def _node(self, cg: Cgroup, cft: CfType | None) -> Node:
        key = (id(cg), cft.name if cft else None)
        node = self.by_key.get(key)
        if node is None:
            mode = DIR_MODE if cft is None else stat.S_IFREG | cft.mode
            node = Node(self.next_inode, cg, cft, mode)
            self.next_inode += 1
            self.nodes[node.inode] = node
            self.by_key[key] = node
        return node

    def _get(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None or node.cgroup.dying:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def files(self, cg: Cgroup) -> list[CfType]:
        """The interface files `cg` has now, in table order."""
        enabled = cg.controllers if not cg.is_root else None
        return [
            cft
            for table in TABLES
            for cft in table
            if cft.where.admits(cg)
            and (cft.controller is None or enabled is None or cft.controller in enabled)
        ]

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = 2 if node.cftype is None else 1
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.stamp
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ENTRY_TIMEOUT
        return attr

    # -- lookup and attributes -----------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._get(parent_inode)
        text = os.fsdecode(name)
        cg = parent.cgroup
        if text == ".":
            return self._attr(parent)
        if text == "..":
            return self._attr(self._node(cg.parent or cg, None))
        child = cg.children.get(text)
        if child is not None:
            return self._attr(self._node(child, None))
        for cft in self.files(cg):
            if cft.name == text:
                return self._attr(self._node(cg, cft))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode, ctx=None):
        return self._attr(self._get(inode))

    # -- directories ---------------------------------------------------------------

    async def opendir(self, inode, ctx):
        node = self._get(inode)
        if node.cftype is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        node = self._get(fh)
        cg = node.cgroup
        entries = [self._node(c, None) for c in cg.children.values()]
        entries += [self._node(cg, cft) for cft in self.files(cg)]
        entries.sort(key=lambda n: n.cftype.name if n.cftype else n.cgroup.name)
        for index, entry in enumerate(entries[start_id:], start_id + 1):
            name = entry.cftype.name if entry.cftype else entry.cgroup.name
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(entry), index):
                break

    async def releasedir(self, fh):
        pass

    # -- files ---------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        node = self._get(inode)
        cft = node.cftype
        if cft is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        text = cft.show(self.ctx, node.cgroup) if cft.show else ""
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = text.encode()
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    async def read(self, fh, off, size):
        return self.handles[fh][off : off + size]

    async def release(self, fh):
        self.handles.pop(fh, None)

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st
