"""Reading a cache from a remote store: whole objects, read-ahead, an optional local disk copy.

``CacheReader`` wraps the ``FsspecStore`` of a URL cache in ``WholeObjectStore`` (local
directories are read directly).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

from zarr.storage import WrapperStore

READ_CACHE_BYTES = 512 << 20  # whole objects kept in memory per process (LRU)
# metadata objects: always asked of the store (zarr probes the Zarr v2 names when a v3 one is absent)
METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


class WholeObjectStore(WrapperStore):
    """A read-only zarr store of a URL whose data objects (shards, unsharded chunks) are fetched
    **whole, once**, the byte ranges zarr asks for being served from memory.

    zarr 3.1 reads a shard as one range GET for its index plus one per inner chunk: a block of
    samples costs dozens of requests where one suffices. Here: one GET per object (``requests``
    counts every GET, metadata included), kept in an LRU of ``max_bytes``; ``prefetch`` starts the
    GETs of objects a later block needs on zarr's I/O loop and returns at once (read-ahead);
    ``cache_dir`` keeps a disk copy of each object fetched, so a second epoch (or run) fetches
    nothing. Metadata (``zarr.json``) always goes to the store: it changes while a dump runs. A
    disk copy gone stale (a cache dumped again at the same URL) fails the per-sample crc32 like
    any corruption: delete ``cache_dir`` then. Per process: build it after a fork (the reader does).
    """

    def __init__(self, inner, *, url: str, cache_dir: str | os.PathLike | None = None,
                 max_bytes: int = READ_CACHE_BYTES):
        super().__init__(inner)
        self._setup(url, cache_dir, max_bytes)

    def _setup(self, url, cache_dir, max_bytes):
        self._url = url
        self._dir = (Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]) if cache_dir else None
        self._max = int(max_bytes)
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._held = 0
        self._inflight: dict[str, asyncio.Task] = {}
        self._missing: set[str] = set()  # keys the store does not have (chunks never written: fill value)
        self.requests = 0  # GETs sent to the store by this process (metadata included)
        self.bytes_fetched = 0
        self.disk_hits = 0

    def __reduce__(self):  # never pickled with a live client: rebuilt where it is used
        raise TypeError("WholeObjectStore is per process: pickle the CacheLocation instead")

    def _remember(self, key: str, data: bytes) -> None:
        self._mem[key] = data
        self._mem.move_to_end(key)
        self._held += len(data)
        while self._held > self._max and len(self._mem) > 1:
            _k, old = self._mem.popitem(last=False)
            self._held -= len(old)

    async def _fetch(self, key: str, prototype) -> bytes | None:
        if self._dir is not None:
            p = self._dir / key
            try:
                data = p.read_bytes()
                self.disk_hits += 1
                return data
            except FileNotFoundError:
                pass
        buf = await self._store.get(key, prototype)
        self.requests += 1
        if buf is None:
            return None
        data = buf.to_bytes()
        self.bytes_fetched += len(data)
        if self._dir is not None:
            p = self._dir / key
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.{os.getpid()}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return data

    async def _whole(self, key: str, prototype) -> bytes | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            return self._mem[key]
        if key in self._missing:
            return None
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.ensure_future(self._fetch(key, prototype))
        try:
            data = await task
        finally:
            self._inflight.pop(key, None)
        if data is None:
            self._missing.add(key)
        elif key not in self._mem:
            self._remember(key, data)
        return data

    async def get(self, key, prototype, byte_range=None):
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

        if key.endswith(METADATA_KEYS):
            self.requests += 1
            return await self._store.get(key, prototype, byte_range)
        data = await self._whole(key, prototype)
        if data is None:
            return None
        if byte_range is None:
            piece = data
        elif isinstance(byte_range, RangeByteRequest):
            piece = data[byte_range.start:byte_range.end]
        elif isinstance(byte_range, OffsetByteRequest):
            piece = data[byte_range.offset:]
        elif isinstance(byte_range, SuffixByteRequest):
            piece = data[-byte_range.suffix:] if byte_range.suffix else b""
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return prototype.buffer.from_bytes(piece)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    def prefetch(self, keys) -> None:
        """Start fetching ``keys`` whole in the background (zarr's I/O loop); returns at once."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import _get_loop

        todo = [k for k in dict.fromkeys(keys) if k not in self._mem and k not in self._inflight
                and k not in self._missing]
        if not todo:
            return
        loop = _get_loop()
        proto = default_buffer_prototype()

        async def run():
            await asyncio.gather(*(self._whole(k, proto) for k in todo), return_exceptions=True)

        asyncio.run_coroutine_threadsafe(run(), loop)
