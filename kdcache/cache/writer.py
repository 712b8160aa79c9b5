"""Write one rank's part of a cache: buffered, crash-safe, resumable.

Commit protocol (per flush): (1) data slabs of every array at the committed offsets, (2) index
rows, (3) the part's ``committed`` attribute (one atomic ``zarr.json`` rewrite). A sample exists
for readers only once (3) is on disk. Zarr >= 3.1.3's LocalStore writes each key to a
``*.partial`` temp file and renames it into place, so a SIGKILL leaves every key either old or
new: what can survive a crash is committed data, data past the commit point (overwritten by the
next run), and ``*.partial`` files (swept on open).

Test hook ``KDCACHE_FAULT`` (environment, parsed once at import; no effect when unset, where a
fault point costs one dict lookup): ``<site>:<n>`` SIGKILLs this process the n-th time (from 1)
it reaches fault point ``site``; ``count`` only counts every site and prints
``kdcache-fault-counts {json}`` to stderr at exit. The sites (``FAULT_SITES``), in commit order:

    data       after each data-array slab write (between two arrays of one drain, or before the index)
    shard      between two shard-sized pieces of one slab that spans more than one shard
    index      between two index-array writes
    commit     right before the ``committed`` attribute update
    committed  right after it
    close      in ``close()``, after each trim/resize of an array, before ``finished: true``

The crash tests (tests/test_crash.py) kill real dumps at these points and resume them.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache.format import (
    AXIS_INDEX,
    AXIS_OF,
    DATA_ARRAYS,
    GRAM_ARRAY,
    LM_HEAD_ARRAY,
    REASON_CODES,
    STATUS_OK,
    ArraySpec,
    CacheFormatError,
    Layout,
    axes,
    ceil_to,
    check_compatible,
    checksum_arrays,
    data_specs,
    hidden_to_storage,
    index_specs,
    read_json_attrs,
    rebuilds_visual_hidden,
    relation_of,
    sample_checksum,
    targets_of,
    validate_attrs,
    zarr_compressors,
    zarr_filters,
)
from kdcache.cache.store import CacheLocked, Lease, cache_location
from kdcache.positions import ROLE_VISUAL, select_positions
from kdcache.records import TeacherRecord

FAULT_ENV = "KDCACHE_FAULT"
FAULT_SITES = ("data", "shard", "index", "commit", "committed", "close")


def parse_fault_spec(spec: str | None) -> dict[str, int]:
    """``KDCACHE_FAULT``'s value -> {site: n-th hit that kills (0: only count)}; {} when unset."""
    if not spec:
        return {}
    if spec == "count":
        return {site: 0 for site in FAULT_SITES}
    site, _, n = spec.partition(":")
    if site not in FAULT_SITES or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <site>:<n> with site one of {', '.join(FAULT_SITES)} "
                         "and n >= 1, or 'count' (unset it for a normal run)")
    return {site: int(n)}


_FAULT_AT = parse_fault_spec(os.environ.get(FAULT_ENV))
_FAULT_HITS: dict[str, int] = {}


def set_fault_plan(spec: str | None) -> dict[str, int]:
    """Replace this process's fault plan (as ``KDCACHE_FAULT=spec`` would) and zero the counters;
    returns the live counter dict {site: hits}, for in-process counting runs."""
    global _FAULT_AT
    _FAULT_AT = parse_fault_spec(spec)
    _FAULT_HITS.clear()
    return _FAULT_HITS


def _fault_point(site: str) -> None:
    """Count a pass through ``site``; SIGKILL this process on the planned hit (test hook only)."""
    n = _FAULT_AT.get(site)  # the whole cost when KDCACHE_FAULT is unset
    if n is None:
        return
    hits = _FAULT_HITS[site] = _FAULT_HITS.get(site, 0) + 1
    if hits == n:
        os.kill(os.getpid(), signal.SIGKILL)


def _print_fault_counts() -> None:
    if _FAULT_AT and not any(_FAULT_AT.values()):
        print("kdcache-fault-counts " + json.dumps(dict(_FAULT_HITS)), file=sys.stderr, flush=True)


atexit.register(_print_fault_counts)


def _check_zarr_version(version: str) -> None:
    # crash safety rests on LocalStore's temp-file + rename writes, added in zarr 3.1.3 (#3412)
    from packaging.version import Version

    if Version(version) < Version("3.1.3"):
        raise RuntimeError(
            f"zarr {version} writes chunks in place, so a killed dump can leave torn chunks; "
            "kdcache needs zarr >= 3.1.3 (pip install 'zarr>=3.1.5,<4')"
        )


def sweep_partials(root: Path) -> list[Path]:
    """Delete leftover ``*.partial`` temp files (killed zarr writes) under ``root``; returns
    the paths deleted."""
    found = [p for p in Path(root).rglob("*.partial") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _tensor_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()




def _lock_part(path: Path, rank: int):
    """An exclusive, non-blocking flock on ``<cache>/.writer-<rank>.lock`` for this writer's life.

    Two dumps started on the same output cannot interleave writes to one part: the second is
    refused at once. The kernel drops the lock when its holder dies (SIGKILL included), so a
    resumed dump is never blocked by a crashed one.
    """
    import fcntl

    path.mkdir(parents=True, exist_ok=True)
    f = open(path / f".writer-{rank}.lock", "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CacheLocked(
            f"part {rank} of {path} is being written by another process (lock {path}/.writer-{rank}.lock): "
            "wait for it to finish, or stop it and run the same command again to resume"
        ) from None
    return f


class CacheWriter:
    """Writer of ``parts/<rank>/`` of the cache at ``path``.

    Rank 0 creates the root group with ``attrs`` (from ``make_attrs``); other ranks wait up to
    ``wait_timeout_s`` for it. An existing cache with different attributes raises CacheMismatch.

    Samples are buffered in memory. Big arrays (top-k ids/log-probs, hidden states) are written
    only in whole shards, as they fill (a partial shard would be read, merged and rewritten by
    every later write: small appends cost ~20x); the narrow arrays share the top-k arrays' shard
    rows, so their shards are one small chunk. Whenever the big arrays have written every row of
    some buffered samples, those samples are committed. Memory is about one shard per big array;
    a crash loses at most the samples of one top-k shard (plus whatever was added since the last
    commit). ``flush``/``close`` write and commit everything. Never one zarr call per sample.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attrs: dict,
        rank: int = 0,
        world_size: int = 1,
        layout: Layout = Layout(),
        *,
        wait_timeout_s: float = 600.0,
    ):
        import zarr

        _check_zarr_version(zarr.__version__)
        validate_attrs(attrs, where="new cache attributes")
        if attrs["settings"]["world_size"] != world_size:
            raise ValueError(
                f"settings.world_size is {attrs['settings']['world_size']} but the writer was "
                f"given world_size={world_size}: build the attributes with the run's world size"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.location = cache_location(path)
        self.path = self.location.local if self.location.is_local else None  # local-only chores (flock, sweeps)
        self.rank = rank
        self.world_size = world_size
        self.layout = layout
        self.settings = attrs["settings"]
        self.hidden_size = int(attrs["teacher"]["hidden_size"])
        self.kinds = tuple(self.settings["positions"])
        self.k = int(self.settings["top_k"])
        self.lp_dtype = np.dtype(self.settings["logprob_dtype"])
        self.hidden_mode = self.settings["hidden"]
        self.target_kind = targets_of(self.settings)  # kdcache.target_kinds: encodes the per-position targets
        self.relation_rank = relation_of(self.settings).rank  # R of relation lowrank:R, else None
        self.axes = axes(self.settings)  # ragged axes: TOTAL_KEYS and the target kind's own
        self.store = self.location.zarr_store(read_only=False)
        self.part_key = f"parts/{rank}"
        # one writer per part: an flock locally; a lease object on a URL (no flock there; README)
        self._lock = _lock_part(self.path, rank) if self.location.is_local else Lease.acquire(self.location, rank)

        if rank == 0:
            self.attrs = self._create_or_check_root(zarr, attrs)
        else:
            self.attrs = self._wait_for_root(attrs, wait_timeout_s)
        if self.location.is_local:  # object stores have no temp files: a PUT is atomic
            sweep_partials(self.path / self.part_key)
        self.part = self._open_part(zarr)

        self.dspecs = data_specs(self.settings, self.hidden_size, layout)
        self.ispecs = index_specs(layout, self.settings)
        self.data = {n: self._require_array(zarr, n, s) for n, s in self.dspecs.items()}
        self.index = {n: self._require_array(zarr, f"index/{n}", s) for n, s in self.ispecs.items()}

        c = self.part.attrs["committed"]
        self.num_committed = int(c["samples"])
        self.totals = {key: int(c[key]) for key in self.axes}
        rows = self.index["row"][: self.num_committed] if self.num_committed else np.zeros(0)
        self._rows: list[int] = [int(r) for r in rows]
        self._row_set = set(self._rows)
        self._reset_buffers()

    # ---- setup -------------------------------------------------------------------------------
    def _create_or_check_root(self, zarr, attrs: dict) -> dict:
        existing = read_json_attrs(self.location)
        if existing is None:
            zarr.create_group(self.store, attributes=attrs)
            existing = attrs
        else:
            if self.location.is_local:
                sweep_partials_root(self.path)
            validate_attrs(existing, where=f"existing cache {self.location}")
            check_compatible(existing, attrs)
        if read_json_attrs(self.location, "parts") is None:
            zarr.create_group(self.store, path="parts")
        return existing

    def _wait_for_root(self, attrs: dict, timeout_s: float) -> dict:
        # Creating parts/<rank> before rank 0 wrote the root would make zarr write an attribute-
        # less root zarr.json that rank 0 would then refuse, so wait for rank 0 to finish.
        deadline = time.monotonic() + timeout_s
        while True:
            existing = read_json_attrs(self.location)
            parts_ready = self.location.exists("parts/zarr.json")
            if existing and "kdcache_format" in existing and parts_ready:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rank {self.rank}: rank 0 did not create the cache root at {self.location} within "
                    f"{timeout_s:.0f} s; start rank 0 too, or raise wait_timeout_s"
                )
            time.sleep(0.05)
        validate_attrs(existing, where=f"existing cache {self.location}")
        check_compatible(existing, attrs)
        return existing

    def _open_part(self, zarr):
        part_attrs = read_json_attrs(self.location, self.part_key)
        if part_attrs is None:
            zero = {"samples": 0, **{key: 0 for key in self.axes}}
            return zarr.create_group(
                self.store,
                path=f"parts/{self.rank}",
                attributes={
                    "rank": self.rank,
                    "world_size": self.world_size,
                    "committed": zero,
                    "finished": False,
                },
            )
        if part_attrs.get("rank") != self.rank or "committed" not in part_attrs:
            raise CacheFormatError(f"{self.location.key(self.part_key)}: not a kdcache part of rank {self.rank}")
        return zarr.open_group(self.store, path=f"parts/{self.rank}", mode="r+")

    def _require_array(self, zarr, name: str, spec: ArraySpec):
        key = f"parts/{self.rank}/{name}"
        if self.location.exists(f"{key}/zarr.json"):
            arr = zarr.open_array(self.store, path=key, mode="r+")
            if arr.shape[1:] != spec.row_shape or str(arr.dtype) != spec.dtype:
                raise CacheFormatError(
                    f"{key}: stored as {arr.dtype} {arr.shape}, expected {spec.dtype} rows of "
                    f"{spec.row_shape}; the cache was written with other settings"
                )
            return arr
        if self.part.attrs["committed"]["samples"] > 0:
            raise CacheFormatError(
                f"{key} is missing although samples were committed: corrupt part; delete "
                f"parts/{self.rank} and rerun that rank"
            )
        attributes = {"logical_dtype": spec.logical_dtype} if spec.logical_dtype else None
        return zarr.create_array(
            self.store,
            name=key,
            shape=(0, *spec.row_shape),
            chunks=(spec.chunk_rows, *spec.row_shape),
            shards=(spec.shard_rows, *spec.row_shape) if spec.shard_rows else None,
            dtype=spec.dtype,
            filters=zarr_filters(spec),
            compressors=zarr_compressors(spec),
            fill_value=0,
            attributes=attributes,
        )

    def _reset_buffers(self) -> None:
        # rows not yet written, per data array (a list of slabs, concatenated lazily)
        self._buf: dict[str, list[np.ndarray]] = {n: [] for n in self.dspecs}
        self._buf_rows = {n: 0 for n in self.dspecs}
        # rows on disk per data array (>= the committed total of its axis)
        self._written = {n: self.totals[AXIS_OF[n]] for n in self.dspecs}
        # index rows of samples added but not committed, and each one's end offset per axis
        self._pending: list[dict] = []
        self._next = dict(self.totals)

    # ---- public API --------------------------------------------------------------------------
    def committed_rows(self) -> list[int]:
        """Dataset rows already committed (ok or skipped) in this part, in commit order."""
        return list(self._rows[: self.num_committed])

    def buffered(self) -> int:
        """Samples added or skipped and not yet committed."""
        return len(self._pending)

    def add(self, record: TeacherRecord) -> None:
        """Buffer one sample (writes whole shards and commits as they fill). Log-probs are cast
        to ``settings.logprob_dtype`` and hidden states to ``settings.hidden``."""
        sid = record.sample_id
        self._check_new_row(record.row, sid)
        ids = _tensor_np(record.input_ids).astype(np.int32, copy=False)  # [T]
        roles = _tensor_np(record.roles).astype(np.uint8, copy=False)  # [T]
        pos = _tensor_np(record.positions).astype(np.int32, copy=False)  # [P]
        kinds = _tensor_np(record.kinds).astype(np.uint8, copy=False)  # [P]
        where = f"sample {sid!r} (row {record.row})"
        T, P = ids.shape[0], pos.shape[0]
        if ids.ndim != 1 or roles.shape != (T,):
            raise ValueError(f"{where}: input_ids {ids.shape} and roles {roles.shape} must be [T]")
        targets = self.target_kind.encode(record, where, P, self)  # the kind's per-position arrays
        want_pos, want_kinds = select_positions(roles, self.kinds)
        if not (np.array_equal(pos, want_pos) and np.array_equal(kinds, want_kinds)):
            raise ValueError(
                f"{where}: positions/kinds are not select_positions(roles, {self.kinds}) "
                f"({P} given, {want_pos.shape[0]} expected); the cache settings' positions must "
                "match the teacher's"
            )
        n_vis = int(np.count_nonzero(roles == ROLE_VISUAL))
        hidden = None
        if "visual_hidden" in self.dspecs:
            if record.visual_hidden is None:
                raise ValueError(f"{where}: visual_hidden is None but settings.hidden is "
                                 f"{self.hidden_mode!r}")
            hidden = hidden_to_storage(record.visual_hidden, self.hidden_mode)  # [N_vis, D]
            if hidden.shape != (n_vis, self.hidden_size):
                raise ValueError(
                    f"{where}: visual_hidden {tuple(hidden.shape)} should be [{n_vis} visual "
                    f"tokens, hidden_size {self.hidden_size}]"
                )
        # targets hidden without stored visual rows: the reader rebuilds visual_hidden from the
        # position rows inside the image span, so every output in it must be a distilled position
        rebuilt = rebuilds_visual_hidden(self.settings)
        if rebuilt and n_vis and not np.isin(np.nonzero(roles == ROLE_VISUAL)[0], pos).all():
            raise ValueError(f"{where}: an output in the image span is not a distilled position (the "
                             "image ends the sequence?), so visual_hidden cannot be rebuilt from "
                             "position_hidden; drop the sample or use --targets topk")
        factor, rel_err = self._visual_factor(record, where, n_vis) if self.relation_rank else (None, 0.0)  # [N_vis, R]
        sid_bytes = np.frombuffer(sid.encode("utf-8"), dtype=np.uint8)
        slabs = {"input_ids": ids, "roles": roles, "positions": pos, "kinds": kinds, **targets,
                 "sample_id_bytes": sid_bytes}
        if hidden is not None:
            slabs["visual_hidden"] = hidden
        if factor is not None:
            slabs["visual_factor"] = factor
        crc = sample_checksum(record.row, sid, checksum_arrays(slabs))
        counts = np.bincount(kinds, minlength=3)[:3].astype(np.int32)
        self._append(slabs, record.row, STATUS_OK, counts, crc, rel_err)
        self._drain(force=False)

    def _visual_factor(self, record: TeacherRecord, where: str, n_vis: int) -> tuple[np.ndarray, float]:
        """relation lowrank:R: record.visual_factor -> stored [N_vis, R] (hidden dtype) and
        record.relation_error, checked (finite, the error in [0, 1.5]: a rank-R truncation keeps
        it <= 1, rounding adds little)."""
        f, err = record.visual_factor, record.relation_error
        if f is None or err is None:
            raise ValueError(f"{where}: settings.relation is {self.settings['relation']!r} but the record has no "
                             "visual_factor / relation_error: make records with teacher_records(relation=...) or "
                             "kdcache.relation.factor_records")
        a = hidden_to_storage(f, self.hidden_mode)  # [N_vis, R]
        if a.shape != (n_vis, self.relation_rank):
            raise ValueError(f"{where}: visual_factor {tuple(a.shape)} should be [{n_vis} visual tokens, "
                             f"rank {self.relation_rank}]")
        if not (np.isfinite(err) and 0.0 <= err <= 1.5):
            raise ValueError(f"{where}: relation_error {err!r} is not a relative error in [0, 1.5]")
        return a, float(err)

    def skip(self, row: int, sample_id: str, reason: int | str) -> None:
        """Record that dataset ``row`` was skipped for ``reason`` (a name or code of
        ``REASON_CODES``), so a resumed dump does not retry it."""
        code = REASON_CODES.get(reason) if isinstance(reason, str) else int(reason)
        if code is None or code == STATUS_OK or not 0 < code < 256:
            raise ValueError(f"unknown skip reason {reason!r}: choose from {sorted(REASON_CODES)}")
        self._check_new_row(row, sample_id)
        sid_bytes = np.frombuffer(sample_id.encode("utf-8"), dtype=np.uint8)
        self._append({"sample_id_bytes": sid_bytes}, row, code, np.zeros(3, np.int32), 0, 0.0)
        self._drain(force=False)

    def flush(self) -> None:
        """Write and commit everything buffered (data, then index rows, then the commit attr),
        including partial shards (which later writes rewrite: call it rarely, e.g. every few
        minutes of a dump; ``add`` commits by itself whenever whole shards are written)."""
        self._drain(force=True)

    def close(self, finished: bool = True) -> None:
        """Flush, trim every array to its committed length, and mark the part finished (or not,
        so that a later writer resumes it)."""
        self.flush()
        for name, arr in self.data.items():
            n = self.totals[AXIS_OF[name]]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
                _fault_point("close")
        for arr in self.index.values():
            if arr.shape[0] != self.num_committed:
                arr.resize((self.num_committed, *arr.shape[1:]))
                _fault_point("close")
        self.part.attrs.update({"finished": bool(finished)})
        if self._lock is not None:
            self._lock.close()  # releases the flock / the lease
            self._lock = None

    def abandon(self) -> None:
        """Release the part's lock without writing anything (after a failed write, e.g. a full
        disk): what was committed stays, the buffered tail is dropped, and a later writer in this
        or another process resumes the part."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def is_finished(self) -> bool:
        return bool(self.part.attrs["finished"])

    def write_gram(self, gram: np.ndarray) -> None:
        """Store M_t = W^T W (float32 [D, D]) of the teacher's LM head once at the root (rank 0)."""
        import zarr

        if self.rank != 0:
            raise ValueError("only rank 0 writes teacher_gram")
        g = np.asarray(gram, dtype=np.float32)
        if g.shape != (self.hidden_size, self.hidden_size):
            raise ValueError(
                f"teacher_gram must be [D, D] with D={self.hidden_size}, got {g.shape}"
            )
        zarr.create_array(self.store, name=GRAM_ARRAY, data=g, chunks=g.shape, overwrite=True,
                          compressors=zarr_compressors(ArraySpec(GRAM_ARRAY, "float32", None, 1,
                                                                 None, "byteshuffle")))

    def write_lm_head(self, w) -> None:
        """Store the teacher's LM head W [V, D] once at the root (rank 0; targets hidden), in the
        hidden states' storage dtype (bf16 as uint16 bits with ``logical_dtype``), chunked like a
        hidden-state array. ``w``: numpy float array or torch tensor (a bf16 tensor is stored
        exactly). Rewritten whole on every run, like ``teacher_gram``."""
        import zarr

        if self.rank != 0:
            raise ValueError(f"only rank 0 writes {LM_HEAD_ARRAY}")
        if self.hidden_mode == "none":
            raise ValueError(f"{LM_HEAD_ARRAY} is stored in the hidden states' dtype, but settings.hidden "
                             "is 'none'")
        t = w.detach() if isinstance(w, torch.Tensor) else torch.from_numpy(np.asarray(w, dtype=np.float32))
        V = int(self.attrs["teacher"]["vocab_size"])
        if tuple(t.shape) != (V, self.hidden_size):
            raise ValueError(f"{LM_HEAD_ARRAY} must be [vocab_size, hidden_size] = [{V}, {self.hidden_size}], "
                             f"got {tuple(t.shape)}")
        data = hidden_to_storage(t, self.hidden_mode)  # [V, D]
        dtype = str(data.dtype)
        spec = ArraySpec(LM_HEAD_ARRAY, dtype, self.hidden_size, 1, None, "byteshuffle-fast")
        chunk_rows, shard_rows = self.layout.rows(spec.row_bytes)
        logical = "bfloat16" if self.hidden_mode == "bf16" else None
        arr = zarr.create_array(self.store, name=LM_HEAD_ARRAY, shape=data.shape, dtype=dtype,
                                chunks=(min(chunk_rows, V), self.hidden_size),
                                shards=(ceil_to(min(shard_rows, V), min(chunk_rows, V)), self.hidden_size),
                                compressors=zarr_compressors(spec), fill_value=0, overwrite=True,
                                attributes={"logical_dtype": logical} if logical else None)
        arr[...] = data

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an exception keep what was committed but do not mark the part finished
        self.close(finished=exc_type is None)

    # ---- internals ---------------------------------------------------------------------------
    def _check_new_row(self, row: int, sample_id: str) -> None:
        if row in self._row_set:
            raise ValueError(
                f"row {row} (sample {sample_id!r}) is already in part {self.rank}; skip rows "
                "listed by committed_rows() when resuming"
            )

    def _append(self, slabs: dict[str, np.ndarray], row, status, counts, crc, relation_error: float) -> None:
        """Buffer a sample's rows and its (not yet committed) index row (``relation_error`` is
        written only with relation lowrank:R)."""
        nx = self._next
        lens = {axis: 0 for axis in self.axes}
        for name, a in slabs.items():
            self._buf[name].append(a)
            self._buf_rows[name] += a.shape[0]
            lens[AXIS_OF[name]] = a.shape[0]
        index_row = {"row": row, "status": status, "counts": counts, "checksum": crc, "relation_error": relation_error}
        for axis in self.axes:  # each axis' offset (and length) columns
            off, ln = AXIS_INDEX[axis]
            index_row[off] = nx[axis]
            if ln is not None:
                index_row[ln] = lens[axis]
        self._pending.append(index_row)
        for axis in self.axes:
            nx[axis] += lens[axis]
        self._pending[-1]["_end"] = dict(nx)
        self._row_set.add(int(row))
        self._rows.append(int(row))

    def _take(self, name: str, n: int) -> np.ndarray:
        """Pop the first ``n`` buffered rows of array ``name`` as one slab."""
        slab = np.concatenate(self._buf[name], axis=0) if self._buf[name] else None
        if slab is None or slab.shape[0] < n:
            have = 0 if slab is None else slab.shape[0]
            raise AssertionError(f"{name}: {n} rows requested, {have} buffered")
        self._buf[name] = [slab[n:]] if slab.shape[0] > n else []
        self._buf_rows[name] -= n
        return slab[:n]

    def _write_rows(self, name: str, n: int) -> None:
        """Write the next ``n`` buffered rows of ``name`` at its on-disk end (one zarr call)."""
        if n <= 0:
            return
        slab = self._take(name, n)
        if self.dspecs[name].logical_dtype == "float16":  # float16 stored as its bits (delta-coded)
            slab = slab.view(np.uint16)
        start = self._written[name]
        arr = self.data[name]
        step = self.dspecs[name].shard_rows
        self._grow(arr, start + n, step)
        # one zarr call per shard the slab touches: a crash between them leaves whole shards, and
        # costs nothing (zarr would encode and write each shard separately anyway)
        cuts = [start, *range(ceil_to(start + 1, step), start + n, step), start + n] if step else [start, start + n]
        for j, (a, b) in enumerate(itertools.pairwise(cuts)):
            if j:
                _fault_point("shard")
            arr[a:b] = slab[a - start : b - start]
        self._written[name] = start + n
        _fault_point("data")

    def _write_big(self, force: bool) -> None:
        """Step 1a: big arrays, in whole shards (everything if ``force``)."""
        for name, spec in self.dspecs.items():
            if not spec.aligned:
                continue
            end = self._written[name] + self._buf_rows[name]
            stop = end if force else (end // spec.shard_rows) * spec.shard_rows
            self._write_rows(name, stop - self._written[name])

    def _drain(self, force: bool) -> None:
        """Write what fills whole shards and commit every sample whose rows are all on disk."""
        if not self._pending:
            return
        self._write_big(force)
        extent = {axis: float("inf") for axis in self.axes}
        for name, spec in self.dspecs.items():
            if spec.aligned:
                extent[AXIS_OF[name]] = min(extent[AXIS_OF[name]], self._written[name])
        j = 0
        while j < len(self._pending) and all(
            self._pending[j]["_end"][a] <= extent[a] for a in self.axes
        ):
            j += 1
        if j == 0:
            return
        ends = self._pending[j - 1]["_end"]
        # step 1b: small arrays (one-chunk shards, cheap to rewrite) up to the commit point
        for name, spec in self.dspecs.items():
            if not spec.aligned:
                self._write_rows(name, ends[AXIS_OF[name]] - self._written[name])
        self._write_index(self._pending[:j])
        self._commit(j, ends)

    def _grow(self, arr, needed: int, step: int) -> None:
        # whole shards at a time: a resize is a metadata rewrite, so keep them rare
        if arr.shape[0] < needed:
            arr.resize((ceil_to(needed, step), *arr.shape[1:]))

    def _write_index(self, rows: list[dict]) -> None:
        """Step 2: index rows after the committed ones (one zarr write per index array)."""
        n = len(rows)
        start = self.num_committed
        for j, (name, spec) in enumerate(self.ispecs.items()):
            if j:
                _fault_point("index")
            slab = np.asarray([r[name] for r in rows], dtype=spec.dtype)
            arr = self.index[name]
            self._grow(arr, start + n, self.layout.index_chunk_rows)
            arr[start : start + n] = slab

    def _commit(self, j: int, ends: dict[str, int]) -> None:
        """Step 3: one atomic rewrite of the part's zarr.json makes the first ``j`` pending
        samples visible."""
        n = self.num_committed + j
        totals = {key: int(ends[key]) for key in self.axes}
        _fault_point("commit")
        self.part.attrs.update({"committed": {"samples": n, **totals}, "finished": False})
        _fault_point("committed")
        self.num_committed = n
        self.totals = totals
        del self._pending[:j]


def sweep_partials_root(path: Path) -> list[Path]:
    """Sweep ``*.partial`` files of root-level nodes (zarr.json, teacher_gram), not other parts."""
    found = [p for p in Path(path).glob("*.partial") if p.is_file()]
    for name in (GRAM_ARRAY, LM_HEAD_ARRAY):
        node = Path(path) / name
        if node.is_dir():
            found += [p for p in node.rglob("*.partial") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def open_writer(path, attrs, rank: int = 0, world_size: int = 1, layout: Layout = Layout(),
                **kw) -> CacheWriter:
    """Same as ``CacheWriter(...)``."""
    return CacheWriter(path, attrs, rank=rank, world_size=world_size, layout=layout, **kw)


def cache_finished(path) -> bool:
    """True when every rank's part of the cache at ``path`` (a path or location) is marked finished."""
    loc = cache_location(path)
    root = read_json_attrs(loc)
    if not root or "settings" not in root:
        return False
    for rank in range(int(root["settings"]["world_size"])):
        part = read_json_attrs(loc, f"parts/{rank}")
        if not part or not part.get("finished"):
            return False
    return True


__all__ = ["CacheWriter", "cache_finished", "open_writer", "sweep_partials", "GRAM_ARRAY", "LM_HEAD_ARRAY",
           "DATA_ARRAYS"]
