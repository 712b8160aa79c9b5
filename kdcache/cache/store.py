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

    # ---- access: zarr's own stores, plus the few whole-object operations the cache needs -------
    def zarr_store(self, *, read_only: bool):
        """zarr's store of this location: ``LocalStore`` for a directory, ``FsspecStore`` for a URL
        (a new client per call: call it in the process that uses it, not before a fork)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)

    def fs(self):
        """(fsspec filesystem, root path) of a URL, listings never cached (other processes write)."""
        return _filesystem(self), self.path.rstrip("/")

    def key(self, key: str) -> str:
        """Where ``key`` (``parts/0/zarr.json``) lives: a local path string or a URL."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        if self.is_local:
            try:
                return (Path(self.path) / key).read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        fs, root = self.fs()
        try:
            return fs.cat_file(f"{root}/{key}")
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        """True when object (file) ``key`` exists."""
        if self.is_local:
            return (Path(self.path) / key).is_file()
        fs, root = self.fs()
        return fs.isfile(f"{root}/{key}")

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """One atomic write of a whole object (local: temp file + rename). ``exclusive``: fail with
        FileExistsError if it exists (S3: a conditional PUT, ``If-None-Match: *``)."""
        if self.is_local:
            p = Path(self.path) / key
            p.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                with open(p, "xb") as f:
                    f.write(data)
                return
            tmp = p.with_name(f"{p.name}.{os.getpid()}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        fs, root = self.fs()
        fs.pipe_file(f"{root}/{key}", data, **({"mode": "create"} if exclusive else {}))

    def delete(self, key: str) -> None:
        """Remove object ``key`` if it is there."""
        if self.is_local:
            (Path(self.path) / key).unlink(missing_ok=True)
            return
        fs, root = self.fs()
        try:
            fs.rm_file(f"{root}/{key}")
        except FileNotFoundError:
            pass

    def children(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (sub-directories / key prefixes and objects)."""
        if self.is_local:
            d = Path(self.path) / prefix
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        fs, root = self.fs()
        base = f"{root}/{prefix}".rstrip("/")
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=False))
        except FileNotFoundError:
            return []

    def nbytes(self, prefix: str = "") -> int:
        """Bytes of every object under ``prefix``."""
        if self.is_local:
            d = Path(self.path) / prefix
            if d.is_file():
                return d.stat().st_size
            return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0
        fs, root = self.fs()
        base = f"{root}/{prefix}".rstrip("/")
        try:
            return int(sum(info["size"] for info in fs.find(base, detail=True).values()))
        except FileNotFoundError:
            return 0


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
    path = rest[2:].rstrip("/")
    if not path:
        raise CacheLocationError(f"{what} {text}: the URL names no bucket or path; write {scheme}://bucket/prefix/c.zarr")
    _check_protocol(scheme, text, what)
    return CacheLocation(f"{scheme}://{path}", scheme, path, dict(storage_options or {}))


def _check_protocol(scheme: str, text: str, what: str) -> None:
    """CacheLocationError unless fsspec knows ``scheme`` and its package is installed."""
    try:
        from fsspec.registry import get_filesystem_class, known_implementations
    except ImportError:  # fsspec comes with zarr's remote extras; without it no URL opens
        raise CacheLocationError(f"{what} {text}: caches at URLs need fsspec: pip install 'kdcache[s3]' "
                                 "(or fsspec plus your protocol's package), or give a local directory") from None
    if scheme not in known_implementations:
        raise CacheLocationError(f"{what} {text}: {scheme}:// is not a storage protocol fsspec knows; give a local "
                                 "directory, or an s3://, gs://, az:// ... URL")
    try:
        get_filesystem_class(scheme)
    except ImportError:
        hint = known_implementations[scheme].get("err", f"install the fsspec package for {scheme}://")
        extra = " (pip install 'kdcache[s3]')" if scheme in ("s3", "s3a") else ""
        raise CacheLocationError(f"{what} {text}: {hint}{extra}") from None


def _filesystem(loc: CacheLocation):
    """The fsspec filesystem of a URL location (fsspec caches instances per process and options,
    and starts afresh in a forked child); listings are not cached: other processes write."""
    import fsspec

    return fsspec.filesystem(loc.protocol, use_listings_cache=False, **loc.storage_options)


def store_errors() -> tuple[type[BaseException], ...]:
    """Exception types a remote store raises when it is unreachable or failing (after the
    client's own retries with backoff: botocore's and s3fs')."""
    errs: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errs += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpError

        errs.append(AiohttpError)
    except ImportError:
        pass
    return tuple(errs)


def parse_storage_options(items: list[str] | tuple[str, ...] | None) -> dict:
    """``--storage-option key=value`` flags -> a storage_options dict. Values are YAML scalars
    (``anon=true`` is a bool, ``max_concurrency=8`` an int); dotted keys nest
    (``client_kwargs.region_name=eu-west-1``)."""
    import yaml

    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CacheLocationError(f"--storage-option {item!r}: expected key=value (e.g. anon=true, "
                                     "endpoint_url=http://127.0.0.1:9000)")
        value = yaml.safe_load(raw) if raw else ""
        d = out
        *parents, last = key.split(".")
        for k in parents:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise CacheLocationError(f"--storage-option {item!r}: {k} is set both as a value and as a mapping")
        d[last] = value
    return out


def merged_options(*layers: dict | None) -> dict:
    """Storage options of several layers (recipe, then flags), later layers winning key by key;
    a new dict, the inputs untouched."""
    out: dict = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            out[k] = merged_options(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- one writer per part on a store without flock: a lease object -------------------------------
LEASE_TTL_S = 120.0  # a writer that stops renewing (killed, hung, partitioned) frees its part after this


class CacheLocked(RuntimeError):
    """Another live process is writing this part of the cache (local flock or object-store lease)."""


@dataclass
class Lease:
    """``.writer-<rank>.lease`` at the cache's root on a URL: the object-store stand-in for the
    local ``flock``. Taken with a conditional PUT (``If-None-Match: *``: the store refuses it when
    the object exists, so of two writers starting together one wins), renewed by its holder
    (a daemon thread renews it every ``ttl_s / 4`` while the process lives, like an flock held
until death), deleted on release. A lease past its expiry, or one
    whose holder is a dead process on this host, is stale: deleted and taken again.

    Where a store ignores ``If-None-Match`` (some S3-compatible servers), the lease is still read
    first and its owner token read back after the PUT, so a second writer started after the
    first one's PUT is refused; two started within the same round trip may both proceed.
    """

    location: CacheLocation
    key: str
    token: str
    ttl_s: float
    _stop: object = None

    @classmethod
    def acquire(cls, location: CacheLocation, rank: int, *, ttl_s: float = LEASE_TTL_S) -> Lease:
        import uuid

        key = f".writer-{rank}.lease"
        lease = cls(location, key, uuid.uuid4().hex, ttl_s)
        for _attempt in range(2):
            held = lease._holder()
            if held is not None:
                if not _stale(held):
                    raise CacheLocked(_held_message(location, rank, key, held))
                location.delete(key)  # stale: its writer is gone
            try:
                location.put_bytes(key, lease._body(), exclusive=True)
            except FileExistsError:
                continue  # someone took it between our read and our PUT: read who, refuse
            if (lease._holder() or {}).get("token") == lease.token:
                _LIVE_TOKENS.add(lease.token)
                lease._start_heartbeat()
                return lease
        held = lease._holder() or {"host": "?", "pid": "?", "expires": 0}
        raise CacheLocked(_held_message(location, rank, key, held))

    def _body(self) -> bytes:
        import json
        import socket
        import time

        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl_s}).encode()

    def _holder(self) -> dict | None:
        import json

        raw = self.location.read_bytes(self.key)
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            return {"token": None, "host": "?", "pid": "?", "expires": 0}  # torn or foreign: stale

    def _start_heartbeat(self) -> None:
        import threading

        stop = self._stop = threading.Event()

        def beat():
            while not stop.wait(self.ttl_s / 4):
                try:
                    self.location.put_bytes(self.key, self._body())
                except Exception:  # a store outage: the next beat retries; expiry is ttl_s away
                    continue

        threading.Thread(target=beat, name=f"kdcache-lease-{self.key}", daemon=True).start()

    def close(self) -> None:
        """Stop renewing and delete the lease if it is still this writer's (best effort: with the
        store down it stays, and expires, or is taken by the next writer, see ``_stale``)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            _LIVE_TOKENS.discard(self.token)
            try:
                if (self._holder() or {}).get("token") == self.token:
                    self.location.delete(self.key)
            except store_errors():
                pass


_LIVE_TOKENS: set[str] = set()  # tokens of the leases this process holds now


def _stale(held: dict) -> bool:
    import socket
    import time

    if float(held.get("expires", 0)) < time.time():
        return True
    if held.get("host") == socket.gethostname() and held.get("pid") == os.getpid():
        return held.get("token") not in _LIVE_TOKENS  # this process, but no writer of it holds it now
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)  # signal 0: does that process exist?
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _held_message(location: CacheLocation, rank: int, key: str, held: dict) -> str:
    import datetime

    until = datetime.datetime.fromtimestamp(float(held.get("expires", 0)), datetime.timezone.utc)
    return (f"part {rank} of {location} is being written by {held.get('host')} pid {held.get('pid')} (lease "
            f"{location.key(key)}, valid until {until:%H:%M:%S} UTC unless renewed): wait for it to finish, or "
            "stop it and run the same command again to resume (a dead writer's lease expires by itself)")


__all__ = ["CacheLocation", "CacheLocationError", "CacheLocked", "LEASE_TTL_S", "LOCAL_SCHEMES", "Lease", "cache_location",
           "merged_options",
           "parse_storage_options", "store_errors"]
