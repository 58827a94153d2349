"""User paths: every path a user gives (workdir, data, checkpoints, outputs) becomes an `etils.epath.Path`.

epath is what Orbax, Grain and TFDS take: local paths and the object stores it knows (gs://, s3://,
az://, hf://) go through one API. `user_path` also refuses what cannot work instead of quietly making a
local folder of it: an unknown scheme (`foo://`) or a scheme written with one slash (`gs:/bucket`, which
the operating system would take for a folder named `gs:`).
"""

from __future__ import annotations

import os
import re

from etils import epath

# First path component that looks like a URI scheme without its `//` ("gs:", "s3:"); a Windows drive
# letter ("C:") is one character and is not matched.
_SCHEME_TYPO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(?!//)")


def user_path(path: epath.PathLike, field: str) -> epath.Path:
    """`path` as an epath.Path; local relative paths are made absolute (Orbax needs absolute paths).

    Args:
        path: a local path or a URI epath supports (gs://bucket/x, s3://..., az://..., hf://...).
        field: the config field or flag the path came from, named in errors.

    Raises:
        ValueError: the path is empty, has a scheme epath does not support, or a scheme with a single slash.
    """
    text = str(path)
    if not text:
        raise ValueError(f"{field}: empty path")
    if _SCHEME_TYPO.match(text):
        raise ValueError(f"{field}={text!r}: looks like a URI with a missing slash (expected e.g. gs://bucket/dir); "
                         "refusing to create a local folder with that name")
    try:
        result = epath.Path(text)
    except KeyError:
        scheme = text.split("://", 1)[0]
        raise ValueError(f"{field}={text!r}: the {scheme}:// scheme is not supported; use a local path or one of "
                         "gs://, s3://, az://, hf://") from None
    return result if is_remote(result) or result.is_absolute() else result.resolve()


def is_remote(path: epath.PathLike) -> bool:
    """True for URIs (gs://, s3://, ...): no mmap, no OS file locks, no local-only shortcuts."""
    return "://" in str(path)


def real_path(path: epath.PathLike) -> str:
    """The path with symbolic links and ".." resolved, to compare an output with the inputs it must not
    overwrite (local paths; object-store URIs as written)."""
    return os.fspath(path) if is_remote(path) else os.path.realpath(os.fspath(path))
