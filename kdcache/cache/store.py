"""Where a cache lives: one function turns a command's cache argument into a ``CacheLocation``.

Every command that takes a cache (``dump --out``, ``train --cache``, ``verify``, ``inspect``,
``export`` and its ``--parquet``, ``eval --teacher-cache``, recipes) and every cache module
(writer, reader, verify, arrow, stats) goes through ``cache_location``::

    cache_location("caches/t.zarr")            local directory, exactly the path given
    cache_location("file:///data/t.zarr")      local directory /data/t.zarr
    cache_location("s3://bucket/runs/t.zarr")  a URL: refused with one line until its scheme is supported

A string that looks like a URL but lost a slash (``s3:/bucket/x``, what ``pathlib.Path``
makes of ``s3://bucket/x``) is refused too, instead of becoming a local directory named ``s3:``.
A ``CacheLocation`` of a URL has no ``__fspath__``: code that would treat it as a local path
fails loudly rather than writing to the working directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# "scheme:" at the start of a string: RFC 3986 scheme characters, two or more of them (a single
# letter is a Windows drive, "C:\\...").
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):(.*)$", re.DOTALL)
LOCAL_SCHEMES = ("file",)


class CacheLocationError(ValueError):
    """A cache argument that names no usable location (unsupported scheme, mangled URL)."""


@dataclass(frozen=True)
class CacheLocation:
    """A cache's place: a local directory (``protocol == "file"``) or an object-store URL.

    ``url``: what messages print (the local path as given, or the URL); ``path``: the local
    directory, or the URL without its ``protocol://`` (``bucket/key`` for s3).
    ``storage_options`` never appear in ``repr``/``str`` (they may hold credentials).
    """

    url: str
    protocol: str
    path: str
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return self.protocol in LOCAL_SCHEMES

    @property
    def local(self) -> Path:
        """The local directory; a URL raises ``CacheLocationError``."""
        if not self.is_local:
            raise CacheLocationError(f"{self.url} is a {self.protocol}:// URL, not a local directory")
        return Path(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.local)

    def __str__(self) -> str:
        return self.url


def cache_location(value: str | os.PathLike | CacheLocation, storage_options: dict | None = None,
                   *, what: str = "cache") -> CacheLocation:
    """``value`` (a local path, ``file://`` URL, or an object-store URL) -> ``CacheLocation``.

    ``what`` names the argument in errors (``"cache"``, ``"--parquet output"``). A
    ``CacheLocation`` passes through (its own storage options kept unless new ones are given).
    Raises ``CacheLocationError`` for a URL whose scheme kdcache cannot open and for a URL that
    lost its ``//``.
    """
    if isinstance(value, CacheLocation):
        if storage_options is None:
            return value
        return CacheLocation(value.url, value.protocol, value.path, dict(storage_options))
    if isinstance(value, Path) or not isinstance(value, str):
        text = os.fspath(value)
    else:
        text = value
    if not text:
        raise CacheLocationError(f"{what}: empty path; give a directory such as caches/t.zarr or a URL")
    m = _SCHEME.match(text)
    if m is None:  # a plain local path, kept exactly as given
        return CacheLocation(text, "file", text, {})
    scheme, rest = m.group(1).lower(), m.group(2)
    if not rest.startswith("/"):  # "name:thing": a local file name with a colon
        return CacheLocation(text, "file", text, {})
    if not rest.startswith("//"):
        raise CacheLocationError(
            f"{what} {text!r} looks like a {scheme}: URL without its '//' (pathlib turns 's3://b/k' into "
            f"'s3:/b/k'): write it as {scheme}://{rest.lstrip('/')}, or ./{text} for a local directory of that name")
    if scheme == "file":
        local = rest[2:]
        if local and not local.startswith("/"):
            raise CacheLocationError(f"{what} {text!r}: a file:// URL needs an absolute path (file:///data/t.zarr); "
                                     "or give the local path itself")
        return CacheLocation(local, "file", local, {})
    raise CacheLocationError(
        f"{what} {text}: caches on {scheme}:// storage are not supported by this kdcache version; "
        "give a local directory (e.g. caches/t.zarr), or copy the cache there first")


__all__ = ["CacheLocation", "CacheLocationError", "LOCAL_SCHEMES", "cache_location"]
