"""gs:// paths served from a local folder through `etils.epath.testing.mock_epath`.

A `gs://bucket/x` path keeps its scheme, so the code under test takes epath's non-local route (no
mmap, no os.path), while every backend call is answered from `<root>/bucket/x`. Calls on gs:// paths
are counted by backend function, so a test can check that a reader went through epath.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Iterator, Optional
from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing

_PREFIX = "gs://"


@contextlib.contextmanager
def redirect_gcs(root: str, fail_writes: Optional[Exception] = None) -> Iterator[collections.Counter]:
    """Within the block, gs:// paths read and write under `root`; yields the per-function call counts.

    Args:
        root: the local folder standing for gs://.
        fail_writes: when given, opening a gs:// file for writing raises it (a read-only bucket).
    """
    calls: collections.Counter = collections.Counter()

    def local(path) -> str:
        path = os.fspath(path)
        return os.path.join(root, path[len(_PREFIX):]) if path.startswith(_PREFIX) else path

    def one(name):
        def fn(original, path, *args, **kwargs):
            if os.fspath(path).startswith(_PREFIX):
                calls[name] += 1
            return original(local(path), *args, **kwargs)
        return fn

    def two(name):
        def fn(original, path, dst, *args, **kwargs):
            if os.fspath(path).startswith(_PREFIX) or os.fspath(dst).startswith(_PREFIX):
                calls[name] += 1
            return original(local(path), local(dst), *args, **kwargs)
        return fn

    def open_(original, path, mode):
        if fail_writes is not None and "w" in mode and os.fspath(path).startswith(_PREFIX):
            raise fail_writes
        return one("open")(original, path, mode)

    def glob(original, pattern):
        matches = original(local(pattern))
        if not os.fspath(pattern).startswith(_PREFIX):
            return matches
        calls["glob"] += 1
        return [_PREFIX + os.path.relpath(m, root) for m in matches]

    single = ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
    # mock_epath swaps the backends by scheme, but with TensorFlow installed epath sends gs:// to its
    # tf.io.gfile backend before looking there; pretend TensorFlow is absent for the block.
    with mock.patch.object(gpath, "_is_tf_installed", lambda: False), epath_testing.mock_epath(
            open=open_, glob=glob, rename=two("rename"), replace=two("replace"), copy=two("copy"),
            **{name: one(name) for name in single}):
        yield calls
