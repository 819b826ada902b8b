"""pyfuse3 Operations serving the hierarchy through the interface-file tables.

Nothing here knows any single file: a directory is a cgroup, a file is a (cgroup, CfType)
pair, and its contents are whatever the row's show() renders. Like seq_file, a read at
offset 0 renders afresh into a per-handle buffer and later offsets continue from it, so
chunked reads are consistent; files are direct_io and report size 0, as kernfs does, except
where the kernel's FUSE needs a size to splice them (`sized_files`).

Attributes and entries are cached by the kernel (ENTRY_TIMEOUT): every change that makes
a name disappear behind the kernel's back (a controller disabled on the parent) is
invalidated before the write that caused it returns; names that appear are never cached
negatively. mkdir/rmdir go through the VFS, which updates its own dentries.

Every handler runs under `_guard`: a KernelError becomes that errno, anything unexpected
becomes EIO and a log line, and the daemon keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from ..model.cgroup import Cgroup
from ..model.constants import PAGE_SIZE
from ..model.errors import KernelError
from .cftype import Caller, CfType, Context, Where
from .core_files import CORE_FILES
from .memory_files import MEMORY_FILES
from .misc_files import MISC_FILES
from .v1_files import CORE_V1_FILES, MEMORY_V1_FILES

log = logging.getLogger(__name__)

TABLES: tuple[tuple[CfType, ...], ...] = (CORE_FILES, MEMORY_FILES, MISC_FILES)
"""Every controller's file table; a cgroup directory lists the rows that admit it."""

V1_TABLES: tuple[tuple[CfType, ...], ...] = (CORE_V1_FILES, MEMORY_V1_FILES, MISC_FILES)
"""The same for cgroup v1 hierarchies (misc shares its table between the versions)."""

TOP_DIR_MODE = stat.S_IFDIR | 0o755
"""cgroup v1: /sys/fs/cgroup is the tmpfs systemd mounts with mode=755 and remounts
read-only once the hierarchies are mounted in it; creating anything there is EROFS."""

ENTRY_TIMEOUT = 60.0
"""Seconds the kernel may cache names and attributes; our changes are invalidated."""

SIZED_FILE_TIMEOUT = 0.0
"""With sized files, a file's name is not cached: every open looks the file up again, so
the size splice stops at is never older than the open (a reply trims it to the contents).
Attributes stay cached: a lookup refreshes them anyway, and fstat need not ask."""

ROOT_DIR_MODE = stat.S_IFDIR | 0o555
"""kernfs makes the cgroup2 root r-x for everyone; mkdir'd cgroups take mkdir's mode."""

NO_OWNER = (0, 0)

SETATTR_FIELDS = (("update_uid", "uid"), ("update_gid", "gid"),
                  ("update_atime", "atime_ns"), ("update_mtime", "mtime_ns"))
"""setattr fields kept as given (pyfuse3's flag, the Node's and st_ attribute's name);
each changes ctime, as kernfs's setattr does."""


def kernfs_name_hash(name: bytes) -> int:
    """fs/kernfs/dir.c's kernfs_name_hash (ns NULL): directory listing order and offset."""
    h = 0
    for c in name:
        h = ((h + (c << 4) + (c >> 4)) * 11) & 0xFFFFFFFFFFFFFFFF
    h = ((h * 0x61C8864680B583EB) & 0xFFFFFFFFFFFFFFFF) >> 32  # hash_long(h, 32)
    h &= 0x7FFFFFFF
    if h < 2:
        h += 2
    return min(h, 0x7FFFFFFE)


@dataclass(eq=False)
class Node:
    """An inode: a cgroup directory (cftype None) or one of its interface files.

    `alive` drops when the name goes away (rmdir, controller disabled); the kernel may
    still hold the inode until it forgets it.
    """

    inode: int
    cgroup: Cgroup
    cftype: CfType | None
    name: bytes
    mode: int
    uid: int
    gid: int
    hash: int
    alive: bool = True
    lookups: int = 0
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = 0
    ctime_ns: int = 0

    def __post_init__(self) -> None:
        self.mtime_ns = self.ctime_ns = self.atime_ns


@dataclass(eq=False)
class Handle:
    node: Node
    caller: Caller
    data: bytes = b""


def _guard(fn):
    """Map KernelError to its errno and anything unexpected to EIO (logged)."""
    quiet = fn.__name__ in ("forget", "release", "releasedir")

    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except KernelError as e:
            log.debug("%s: %s", fn.__name__, e)
            if quiet:
                return None
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args)
            if quiet:
                return None
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


class CgroupFs(pyfuse3.Operations):
    """The filesystem. `ctx` carries the model the rows read and write."""

    enable_writeback_cache = False

    sized_files = False
    """Report a readable file's length, rounded up past it to a page, instead of 0.
    Kernels with FUSE commit 2cb1e08985e3 but not its fix ("fuse: use copy_splice_read()
    for FOPEN_DIRECT_IO") serve splice and sendfile of direct-I/O files from the page
    cache, which ends at i_size: busybox cat would print nothing. A size one byte or more
    past the content lets the read come back short, and FUSE then trims i_size to the
    content (fuse_short_read), so splice ends exactly where read() does; the rounding
    keeps sizes sysfs-like (4096) so tail's and readers' size hints still hold."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _guard_all(cls)

    def __init__(self, ctx: Context, *, v1: tuple[Context, ...] = ()) -> None:
        """v2: `ctx`'s hierarchy is the mount's root. v1 (`v1` given, `ctx` its first):
        the root is a read-only tmpfs-like directory holding each context's hierarchy
        under its controller's name (/sys/fs/cgroup/misc, /sys/fs/cgroup/memory)."""
        super().__init__()
        self.ctx = ctx
        self.contexts = {c.hierarchy.root: c for c in (v1 or (ctx,))}
        for c in self.contexts.values():
            c.may_write_procs = self._may_write_procs
        self.tables = V1_TABLES if v1 else TABLES
        for c in self.contexts.values():
            for table in self.tables:
                for controller in {cft.controller for cft in table} - {None}:
                    c.hierarchy.add_cftypes(controller, frozenset(
                        cft.name for cft in table
                        if cft.controller == controller and cft.where is not Where.ROOT))
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[tuple[Cgroup, str | None], Node] = {}
        self.owners: dict[tuple[Cgroup, str | None], tuple[int, int]] = {}
        self.next_inode = pyfuse3.ROOT_INODE
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.top: Cgroup | None = None
        if v1:
            self.top = Cgroup("", None)  # a directory, not a cgroup: no files, no css
            self.top.children = {root.name: root for root in self.contexts}
            self._node(self.top, None).mode = TOP_DIR_MODE
        else:
            self._node(ctx.hierarchy.root, None)

    def _ctx(self, cg: Cgroup) -> Context:
        """The context of the hierarchy `cg` is in."""
        if len(self.contexts) == 1:
            return self.ctx
        while cg.parent is not None:
            cg = cg.parent
        return self.contexts[cg]

    def _parent_dir(self, cg: Cgroup) -> Cgroup:
        """`..`: a v1 hierarchy's root sits in the top directory."""
        if cg.parent is not None:
            return cg.parent
        return self.top if self.top is not None else cg

    def _check_top(self, node: Node) -> None:
        if node.cgroup is self.top:
            raise pyfuse3.FUSEError(errno.EROFS)

    # -- inode registry ------------------------------------------------------------

    def _node(self, cg: Cgroup, cft: CfType | None) -> Node:
        key = (cg, cft.name if cft else None)
        node = self.by_key.get(key)
        if node is None:
            if cft is None:
                name = os.fsencode(cg.name)
                mode = ROOT_DIR_MODE if cg.is_root else stat.S_IFDIR | 0o755
            else:
                name = cft.name.encode()
                mode = stat.S_IFREG | cft.mode
            uid, gid = self.owners.get(key) or self.owners.get((cg, None), NO_OWNER)
            node = Node(self.next_inode, cg, cft, name, mode, uid, gid, kernfs_name_hash(name))
            self.next_inode += 1
            self.nodes[node.inode] = node
            self.by_key[key] = node
        return node

    def _drop(self, cg: Cgroup, name: str | None) -> Node | None:
        """The name is gone: later lookups get a fresh inode, open handles get ENODEV."""
        self.owners.pop((cg, name), None)
        node = self.by_key.pop((cg, name), None)
        if node is not None:
            node.alive = False
            if node.lookups <= 0:
                self.nodes.pop(node.inode, None)
        return node

    def _get(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _live(self, inode: int) -> Node:
        node = self._get(inode)
        if not node.alive:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def files(self, cg: Cgroup) -> list[CfType]:
        """The interface files `cg` has now, in table order."""
        if cg is self.top:
            return []
        return [cft for table in self.tables for cft in table if self._has(cg, cft)]

    @staticmethod
    def _has(cg: Cgroup, cft: CfType) -> bool:
        return cft.where.admits(cg) and (
            cft.controller is None or cft.controller in cg.controllers)

    def _file(self, cg: Cgroup, name: str) -> CfType | None:
        if cg is self.top:
            return None
        for table in self.tables:
            for cft in table:
                if cft.name == name:
                    return cft if self._has(cg, cft) else None
        return None

    def _attr(self, node: Node, caller: Caller) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = 1 if node.cftype else 2 + (len(node.cgroup.children) if node.alive else 0)
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_size = 0
        attr.st_blksize = PAGE_SIZE
        attr.st_blocks = 0
        attr.st_atime_ns = node.atime_ns
        attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ENTRY_TIMEOUT
        if self.sized_files and node.cftype is not None:
            attr.st_size = self._size(node, caller)
            attr.entry_timeout = SIZED_FILE_TIMEOUT
        return attr

    def _size(self, node: Node, caller: Caller) -> int:
        """`sized_files`: what `caller` would read now, plus at least a byte, in pages."""
        cft = node.cftype
        if not cft.readable or not node.alive or node.cgroup.dying:
            return 0
        try:
            text = cft.render(self._ctx(node.cgroup), node.cgroup, caller)
        except KernelError:  # the read will say why; the name is still there
            return 0
        return (len(text.encode()) // PAGE_SIZE + 1) * PAGE_SIZE

    def _entry(self, node: Node, caller: Caller) -> pyfuse3.EntryAttributes:
        """An attr that hands the kernel a reference (lookup, mkdir, readdirplus)."""
        node.lookups += 1
        return self._attr(node, caller)

    async def size_files(self) -> None:
        """Switch to `sized_files` while serving: names the kernel has cached with size 0
        are dropped, so their next open looks them up afresh."""
        self.sized_files = True
        cached = []
        for node in self.nodes.values():
            parent = self.by_key.get((node.cgroup, None))
            if node.cftype is not None and node.alive and node.lookups > 0 and parent:
                cached.append((parent.inode, node.name))
        if cached:
            await trio.to_thread.run_sync(_invalidate, cached)

    # -- permissions ---------------------------------------------------------------

    def _may_write_procs(self, cg: Cgroup, caller: Caller) -> bool:
        """inode_permission(MAY_WRITE) on cg's cgroup.procs for the caller."""
        node = self._node(cg, self._file(cg, "cgroup.procs"))
        mode = node.mode
        if caller.uid == node.uid:
            return bool(mode & stat.S_IWUSR)
        groups = {caller.gid}
        with contextlib.suppress(OSError):
            groups |= pyfuse3.get_sup_groups(caller.pid)
        if node.gid in groups:
            return bool(mode & stat.S_IWGRP)
        return bool(mode & stat.S_IWOTH)

    # -- lookup and attributes -----------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        parent = self._live(parent_inode)
        cg = parent.cgroup
        caller = _caller(ctx)
        if parent.cftype is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._entry(parent, caller)
        if name == b"..":
            return self._entry(self._node(self._parent_dir(cg), None), caller)
        text = os.fsdecode(name)
        child = cg.children.get(text)
        if child is not None:
            return self._entry(self._node(child, None), caller)
        cft = self._file(cg, text)
        if cft is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(self._node(cg, cft), caller)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and not node.alive:
                del self.nodes[inode]

    async def getattr(self, inode, ctx):
        return self._attr(self._get(inode), _caller(ctx))

    async def setattr(self, inode, attr, fields, fh, ctx):
        """chmod, chown and utimes are kept (delegation); truncation is accepted and
        changes nothing (`echo x > file` truncates first), as kernfs does."""
        node = self._get(inode)
        changed = fields.update_mode
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        for flag, name in SETATTR_FIELDS:
            if getattr(fields, flag):
                setattr(node, name, getattr(attr, "st_" + name))
                changed = True
        if fields.update_ctime:
            node.ctime_ns = attr.st_ctime_ns
        elif changed:
            node.ctime_ns = time.time_ns()
        return self._attr(node, _caller(ctx))

    async def statfs(self, ctx):
        """What cgroup2's statfs reports, less f_type (FUSE always answers its own
        magic, 0x65735546; cgroup2's 0x63677270 cannot be carried) and f_fsid."""
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = PAGE_SIZE
        st.f_blocks = st.f_bfree = st.f_bavail = 0
        st.f_files = st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- directories ---------------------------------------------------------------

    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._live(parent_inode)
        if parent.cftype is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._check_top(parent)
        cg = self._ctx(parent.cgroup).tracker.mkdir(parent.cgroup, os.fsdecode(name))
        owner = (ctx.uid, ctx.gid)
        if owner != NO_OWNER:  # kernfs nodes get the creator's fsuid/fsgid
            self.owners[(cg, None)] = owner
        node = self._node(cg, None)
        node.mode = stat.S_IFDIR | (mode & 0o7777)
        return self._entry(node, _caller(ctx))

    async def rmdir(self, parent_inode, name, ctx):
        parent = self._live(parent_inode)
        self._check_top(parent)
        cg = parent.cgroup.children.get(os.fsdecode(name))
        if cg is None:
            if self._file(parent.cgroup, os.fsdecode(name)) is not None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            raise pyfuse3.FUSEError(errno.ENOENT)
        context = self._ctx(cg)
        context.tracker.rmdir(cg)
        for key in [k for k in self.by_key if k[0] is cg]:
            self._drop(*key)
        self.owners.pop((cg, None), None)

    async def opendir(self, inode, ctx):
        """The handle keeps the opener: readdirplus attributes are theirs (sized files)."""
        node = self._get(inode)
        if node.cftype is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._handle(node, ctx)

    async def readdir(self, fh, start_id, token):
        """`.` and `..`, then children and files in kernfs order (by name hash, which is
        also the resume offset, so entries appearing or going mid-listing are safe)."""
        handle = self.handles[fh]
        node, caller = handle.node, handle.caller
        cg = node.cgroup
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attr(node, caller), 1):
            return
        if start_id < 2:
            parent = self._node(self._parent_dir(cg), None) if node.alive else node
            if not pyfuse3.readdir_reply(token, b"..", self._attr(parent, caller), 2):
                return
        if not node.alive:
            return
        entries = [self._node(c, None) for c in cg.children.values()]
        entries += [self._node(cg, cft) for cft in self.files(cg)]
        entries.sort(key=lambda n: (n.hash, n.name))
        for entry in entries:
            if entry.hash + 1 <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, entry.name, self._attr(entry, caller),
                                         entry.hash + 1):
                break
            entry.lookups += 1

    async def releasedir(self, fh):
        self.handles.pop(fh, None)

    # -- names that cannot be made ----------------------------------------------------

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._check_top(self._get(parent_inode))
        raise pyfuse3.FUSEError(errno.EACCES)  # kernfs dirs have no ->create

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        """FUSE sends a regular file's mknod(2) here too (fuse_create): the VFS gives
        that EACCES on kernfs (no ->create), any other node type EPERM (no ->mknod)."""
        self._check_top(self._get(parent_inode))
        raise pyfuse3.FUSEError(errno.EACCES if stat.S_ISREG(mode) else errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        self._check_top(self._get(parent_inode))
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._check_top(self._get(new_parent_inode))
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        self._check_top(self._get(parent_inode))
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._check_top(self._get(parent_inode_old))
        self._check_top(self._get(parent_inode_new))
        raise pyfuse3.FUSEError(errno.EPERM)  # cgroup2 has no kernfs ->rename

    # -- files ---------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        node = self._live(inode)
        if node.cftype is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=self._handle(node, ctx), direct_io=True, keep_cache=False,
                                nonseekable=False)

    def _handle(self, node: Node, ctx) -> int:
        """A new open file or directory, remembering who opened it."""
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(node, _caller(ctx))
        return fh

    def _active(self, fh: int) -> Handle:
        """kernfs_get_active: the file (and its cgroup) must still exist, else ENODEV."""
        handle = self.handles[fh]
        if not handle.node.alive or handle.node.cgroup.dying:
            raise pyfuse3.FUSEError(errno.ENODEV)
        return handle

    async def read(self, fh, off, size):
        handle = self._active(fh)
        cft = handle.node.cftype
        if not cft.readable:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off == 0 or not handle.data:
            handle.data = cft.render(self._ctx(handle.node.cgroup), handle.node.cgroup,
                                     handle.caller).encode()
        return handle.data[off : off + size]

    async def write(self, fh, off, buf):
        """kernfs_fop_write_iter: over a page is E2BIG; each write() is parsed whole."""
        if len(buf) > PAGE_SIZE:
            raise pyfuse3.FUSEError(errno.E2BIG)
        handle = self._active(fh)
        cft = handle.node.cftype
        if cft.write is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        cg = handle.node.cgroup
        before = cg.subtree_control
        # the kernel NUL-terminates the buffer and parses it as a C string
        text = buf.decode("latin-1").split("\0", 1)[0]
        cft.write(self._ctx(cg), cg, text, handle.caller)
        if cg.subtree_control != before:
            await self._controllers_changed(cg, before, handle.caller)
        return len(buf)

    async def release(self, fh):
        self.handles.pop(fh, None)

    async def _controllers_changed(self, cg: Cgroup, before, caller: Caller) -> None:
        """Children gained or lost controller files: new files belong to whoever enabled
        them; vanished ones are invalidated in the kernel before the write returns."""
        added = cg.subtree_control - before
        removed = before - cg.subtree_control
        gone: list[tuple[int, bytes]] = []
        for child in cg.children.values():
            for table in self.tables:
                for cft in table:
                    if cft.controller in added and cft.where.admits(child):
                        self.owners[(child, cft.name)] = (caller.uid, caller.gid)
                    elif cft.controller in removed:
                        node = self._drop(child, cft.name)
                        parent = self.by_key.get((child, None))
                        if node is not None and parent is not None:
                            gone.append((parent.inode, node.name))
        if gone:
            await trio.to_thread.run_sync(_invalidate, gone)


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    """Who asks: what the rows render for (pid namespace) and permission checks use."""
    return Caller(ctx.pid, ctx.uid, ctx.gid)


def _invalidate(entries: list[tuple[int, bytes]]) -> None:
    """In a worker thread: the kernel may need the loop to answer a lookup meanwhile."""
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("invalidating %r in %d: %s", name, parent, e)


def _guard_all(cls) -> None:
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and not name.startswith("_"):
            setattr(cls, name, _guard(fn))


_guard_all(CgroupFs)
