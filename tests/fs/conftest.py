"""Fixtures for the fs tests: a fresh cgroup in the session's shared mount."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .util import remove_tree

_names = itertools.count()


@pytest.fixture
def root(shared_epcfs) -> Path:
    """The shared mount's root (memory and misc enabled for its children)."""
    return shared_epcfs.path


@pytest.fixture
def cg(root: Path, request) -> Iterator[Path]:
    """A new, empty cgroup under the shared root, removed with its subtree afterwards."""
    path = root / f"t{next(_names)}-{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)[:40]}"
    path.mkdir()
    yield path
    remove_tree(path)
