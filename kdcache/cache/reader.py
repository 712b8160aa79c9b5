"""Read a cache: committed samples only, whole slabs per zarr call, lazily opened per process.

``CacheReader`` gives ``TeacherRecord`` s back; ``CacheDataset`` streams them in a deterministic
shuffled order (``global_order``) split over ranks and DataLoader workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from kdcache.cache.format import (
    AXIS_INDEX,
    AXIS_OF,
    GRAM_ARRAY,
    LM_HEAD_ARRAY,
    REASON_NAMES,
    STATUS_OK,
    CacheCorrupt,
    CacheFormatError,
    checksum_arrays,
    data_array_names,
    hidden_from_storage,
    index_arrays,
    read_json_attrs,
    rebuilds_visual_hidden,
    sample_checksum,
    storage_view,
    targets_of,
    validate_attrs,
)
from kdcache.cache.store import CacheLocation, cache_location
from kdcache.positions import ROLE_VISUAL
from kdcache.records import TeacherRecord

@dataclass
class PartIndex:
    """Committed index of one part, in memory (~60 bytes per sample).

    ``ok`` holds the index rows of committed ok samples: sample ``i`` of the part (as counted by
    ``read_range`` and ``global_order``) is index row ``ok[i]``.
    """

    rank: int
    num_committed: int
    totals: dict[str, int]
    finished: bool
    cols: dict[str, np.ndarray]
    ok: np.ndarray  # int64 [S_ok]

    def __post_init__(self):
        self._len = {}
        for axis, (off, ln) in AXIS_INDEX.items():
            if off not in self.cols:  # an axis of another target kind
                continue
            if axis == "positions":
                self._len[axis] = self.cols["counts"].sum(axis=1, dtype=np.int64)
            else:
                self._len[axis] = self.cols[ln].astype(np.int64)

    @property
    def axes(self) -> list[str]:
        """The ragged axes this part has (``kdcache.cache.format.axes`` of its settings)."""
        return list(self._len)

    def length(self, axis: str) -> np.ndarray:
        """[S] rows of each sample on ``axis``."""
        return self._len[axis]

    def offset(self, axis: str) -> np.ndarray:
        """[S] first row of each sample on ``axis``."""
        return self.cols[AXIS_INDEX[axis][0]]


def load_part_index(zarr, store, root: CacheLocation, rank: int, settings: dict) -> PartIndex:
    """Read the committed index rows of ``parts/<rank>`` (one zarr read per index column of
    ``index_arrays(settings)``, the cache's settings)."""
    attrs = read_json_attrs(root, f"parts/{rank}")
    if attrs is None or "committed" not in attrs:
        raise CacheFormatError(f"{root}/parts/{rank}: missing part attributes")
    n = int(attrs["committed"]["samples"])
    cols = {}
    for name in index_arrays(settings):
        arr = zarr.open_array(store, path=f"parts/{rank}/index/{name}", mode="r", zarr_format=3)
        if arr.shape[0] < n:
            raise CacheFormatError(
                f"parts/{rank}/index/{name} has {arr.shape[0]} rows but {n} are committed"
            )
        cols[name] = arr[:n] if n else np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    ok = np.nonzero(cols["status"] == STATUS_OK)[0].astype(np.int64)
    totals = {k: int(v) for k, v in attrs["committed"].items() if k != "samples"}
    p = PartIndex(rank, n, totals, bool(attrs.get("finished", False)), cols, ok)
    _check_extents(p, root)
    return p


def _check_extents(p: PartIndex, root: CacheLocation) -> None:
    """CacheCorrupt unless every committed sample's rows lie inside the commit record's totals:
    a damaged index must never turn into slices of other samples' rows (or huge reads)."""
    for axis in p.axes:
        off, ln = p.offset(axis).astype(np.int64), p.length(axis)
        total = p.totals.get(axis)
        if total is None:
            raise CacheFormatError(f"{root}/parts/{p.rank}: commit record has no {axis!r} total")
        bad = np.nonzero((off < 0) | (ln < 0) | (off + ln > total))[0]
        if len(bad):
            i = int(bad[0])
            raise CacheCorrupt(
                f"{root}/parts/{p.rank}: index row {i} (row {int(p.cols['row'][i])}) has {axis} rows "
                f"{int(off[i])}:{int(off[i] + ln[i])} outside the committed {total}; run `kdcache verify` "
                "and re-dump the damaged part")


def list_parts(root) -> list[int]:
    """Ranks of the parts (``parts/<rank>/zarr.json``) of the cache at ``root`` (path or location)."""
    loc = cache_location(root)
    return sorted(int(n) for n in loc.children("parts") if n.isdigit() and loc.exists(f"parts/{n}/zarr.json"))


# Arrays whose rows to read exceed this are read run by run instead of over the whole span.
WIDE_READ_BYTES = 4 << 20


class CacheReader:
    """Read-only view of the committed samples of a cache (a snapshot taken when first used;
    ``refresh()`` takes a new one).

    Picklable: only the path travels; zarr arrays are opened lazily in each process, so it can be
    handed to DataLoader workers. ``check=True`` verifies each sample's crc32 on read and raises
    CacheCorrupt naming the sample.
    """

    def __init__(self, path: str | os.PathLike, *, check: bool = True, cache_dir: str | os.PathLike | None = None):
        self.location = cache_location(path)
        # a URL cache: objects fetched whole (remote.WholeObjectStore), kept on disk here if given
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.path = self.location  # what messages print: the local path as given, or the URL
        self.check = check
        attrs = read_json_attrs(self.location)
        if attrs is None:
            raise FileNotFoundError(f"no cache at {self.location} (no zarr.json)")
        validate_attrs(attrs, where=f"cache {self.location}")
        self.attrs: dict = attrs
        self._state = None

    def __getstate__(self):
        return {"location": self.location, "path": self.path, "check": self.check, "cache_dir": self.cache_dir, "attrs": self.attrs, "_state": None}

    def __setstate__(self, state):
        self.__dict__.update(state)

    # ---- lazy per-process state ----------------------------------------------------------------
    def _st(self) -> dict:
        if self._state is None or self._state["pid"] != os.getpid():
            import zarr

            # opened here, in the process that reads: fsspec/obstore clients are not fork-safe
            store = self.location.zarr_store(read_only=True)
            if not self.location.is_local:  # one GET per shard, not per inner chunk; read-ahead
                from kdcache.cache.remote import WholeObjectStore

                store = WholeObjectStore(store, url=self.location.url, cache_dir=self.cache_dir)
            try:
                parts = {r: load_part_index(zarr, store, self.location, r, self.attrs["settings"])
                         for r in list_parts(self.location)}
            except (CacheCorrupt, CacheFormatError):
                raise
            except Exception as e:  # damaged part attributes or index chunks: zarr/numpy errors of any kind
                raise CacheCorrupt(f"cache {self.path}: cannot read a part's index ({type(e).__name__}: {e}); "
                                   "run `kdcache verify` and re-dump the damaged part") from e
            self._state = {"pid": os.getpid(), "zarr": zarr, "store": store, "parts": parts,
                           "arrays": {}, "by_row": None}
        return self._state

    @property
    def requests(self) -> int:
        """GETs this process sent to a URL cache's store so far (0 for a local directory)."""
        return getattr(self._st()["store"], "requests", 0)

    def prefetch_rows(self, p: PartIndex, idx: np.ndarray) -> None:
        """Start fetching, in the background, the objects holding index rows ``idx`` of part ``p``
        (read-ahead of a URL cache; nothing for a local directory)."""
        store = self._st()["store"]
        if not hasattr(store, "prefetch") or len(idx) == 0:
            return
        keys = []
        for name in (*data_array_names(self.attrs["settings"]), "sample_id_bytes"):
            axis = AXIS_OF[name]
            off, ln = p.offset(axis)[idx].astype(np.int64), p.length(axis)[idx].astype(np.int64)
            if not (ln > 0).any():
                continue
            arr = self._array(p.rank, name)
            rows = (arr.shards or arr.chunks)[0]  # one object per shard (or per chunk, unsharded)
            lo, hi = int(off[ln > 0].min()), int((off + ln).max())
            for s in range(lo // rows, (hi - 1) // rows + 1):
                keys.append(f"parts/{p.rank}/{name}/" + arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1)))
        store.prefetch(keys)

    def refresh(self) -> None:
        """Re-read the part attributes and indices (see newly committed samples)."""
        self._state = None

    def _array(self, rank: int, name: str):
        st = self._st()
        key = (rank, name)
        if key not in st["arrays"]:
            st["arrays"][key] = st["zarr"].open_array(st["store"], path=f"parts/{rank}/{name}",
                                                      mode="r", zarr_format=3)
        return st["arrays"][key]

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def parts(self) -> dict[int, PartIndex]:
        return self._st()["parts"]

    @property
    def part_sizes(self) -> list[int]:
        """Committed ok samples per part, in rank order (the input of ``global_order``)."""
        return [len(p.ok) for p in self.parts.values()]

    @property
    def part_ranks(self) -> list[int]:
        return list(self.parts)

    @property
    def num_samples(self) -> int:
        return sum(self.part_sizes)

    @property
    def k(self) -> int:
        return int(self.attrs["settings"]["top_k"])

    def rows(self) -> list[int]:
        """Dataset rows of the committed ok samples, part by part."""
        return [int(r) for p in self.parts.values() for r in p.cols["row"][p.ok]]

    def skipped(self) -> list[tuple[int, str, str]]:
        """(row, sample_id, reason) of skipped samples."""
        out = []
        for p in self.parts.values():
            bad = np.nonzero(p.cols["status"] != STATUS_OK)[0]
            if len(bad):
                ids = self.sample_ids(p, bad)
                out += [(int(p.cols["row"][i]), s,
                         REASON_NAMES.get(int(p.cols["status"][i]), "unknown"))
                        for i, s in zip(bad, ids)]
        return out

    def gram(self) -> np.ndarray:
        """M_t = W^T W of the teacher's LM head: float32 [D, D]."""
        st = self._st()
        if not self.location.exists(f"{GRAM_ARRAY}/zarr.json"):
            raise FileNotFoundError(f"cache {self.path} has no {GRAM_ARRAY} (rank 0 writes it "
                                    "with writer.write_gram)")
        return st["zarr"].open_array(st["store"], path=GRAM_ARRAY, mode="r", zarr_format=3)[...]

    def lm_head(self) -> torch.Tensor:
        """The teacher's LM head W [V, D] (targets hidden): torch.bfloat16 when stored as bf16
        bits, else float16 / float32 as stored. logits = position_hidden @ W^T."""
        st = self._st()
        if not self.location.exists(f"{LM_HEAD_ARRAY}/zarr.json"):
            raise FileNotFoundError(f"cache {self.path} has no {LM_HEAD_ARRAY} (targets "
                                    f"{self.attrs['settings']['targets']!r}; rank 0 of a --targets hidden "
                                    "dump writes it with writer.write_lm_head)")
        arr = st["zarr"].open_array(st["store"], path=LM_HEAD_ARRAY, mode="r", zarr_format=3)
        return hidden_from_storage(arr[...], arr.attrs.get("logical_dtype"))

    # ---- data --------------------------------------------------------------------------------
    def sample_ids(self, p: PartIndex, idx: np.ndarray) -> list[str]:
        """Sample ids of index rows ``idx`` (ascending) of part ``p`` (one zarr read)."""
        if len(idx) == 0:
            return []
        off, ln = p.cols["id_offset"][idx], p.cols["id_len"][idx]
        lo, hi = int(off.min()), int((off + ln).max())
        raw = self._array(p.rank, "sample_id_bytes")[lo:hi]
        ids = [bytes(raw[o - lo : o - lo + n]).decode("utf-8") for o, n in zip(off, ln)]
        if any(not s or "\x00" in s for s in ids):  # a lost chunk reads as NULs; skipped ids have no crc
            raise CacheCorrupt(f"cache {self.path}, part {p.rank}: empty or NUL sample ids (a damaged or "
                               "missing sample_id_bytes chunk); run `kdcache verify` and re-dump the part")
        return ids

    def read_slab(self, rank: int, idx: np.ndarray, arrays) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The rows of index rows ``idx`` (ascending) of every array in ``arrays``: name ->
        (slab, starts), sample ``idx[j]``'s rows being ``slab[starts[j] : starts[j] + length]``.

        Narrow arrays are read in one zarr call over the whole span (a call costs ~1 ms whatever
        its size). Wide ones (hidden states, factors: a chunk holds about a sample) are read one
        run of consecutive samples at a time, so a DataLoader worker that needs a few samples of
        a block decodes only theirs, not the block. Raises CacheCorrupt naming the array on a
        decode error."""
        p = self.parts[rank]
        out = {}
        for name in arrays:
            axis = AXIS_OF[name]
            off = p.offset(axis)[idx].astype(np.int64)
            ln = p.length(axis)[idx].astype(np.int64)
            arr = self._array(rank, name)
            row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
            if row_bytes * int(ln.sum()) >= WIDE_READ_BYTES:
                # runs of samples stored back to back: one read each
                brk = np.nonzero(off[1:] != off[:-1] + ln[:-1])[0] + 1
                runs = [(int(off[a]), int(off[b - 1] + ln[b - 1])) for a, b in
                        zip(np.r_[0, brk], np.r_[brk, len(idx)])]
            else:
                runs = [(int(off[0]), int(off[-1] + ln[-1]))]
            pieces, base, starts = [], 0, np.empty(len(idx), dtype=np.int64)
            for lo, hi in runs:
                try:
                    pieces.append(arr[lo:hi])
                except Exception as e:  # zarr raises assorted errors for corrupt/truncated chunks
                    hit = p.cols["row"][idx[(off < hi) & (off + ln > lo)]]
                    rows = f"dataset row {int(hit[0])}" + (f" and {len(hit) - 1} more" if len(hit) > 1 else "")
                    raise CacheCorrupt(
                        f"cache {self.path}, parts/{rank}/{name} rows {lo}:{hi} ({rows}): cannot decode "
                        f"({type(e).__name__}: {e}); run `kdcache verify` and re-dump the damaged part"
                    ) from e
                inside = (off >= lo) & (off < hi) | ((ln == 0) & (off == hi))
                starts[inside] = off[inside] - lo + base
                base += hi - lo
            slab = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            out[name] = (storage_view(slab, arr.attrs.get("logical_dtype")), starts)
        return out

    def read_range(self, part: int, start: int, stop: int) -> list[TeacherRecord]:
        """Committed ok samples ``start:stop`` of part ``part`` (one zarr read per array)."""
        p = self.parts[part]
        idx = p.ok[start:stop]
        if len(idx) == 0:
            return []
        return self.read_rows(p, idx)

    def read_rows(self, p: PartIndex, idx: np.ndarray) -> list[TeacherRecord]:
        """Records of index rows ``idx`` (ascending, ok samples) of part ``p``: one zarr read
        per array spanning ``idx[0]..idx[-1]``, then numpy slices. Any failure on damaged data
        is CacheCorrupt naming the part (never a bare numpy/zarr/codec error)."""
        try:
            return self._read_rows(p, idx)
        except (CacheCorrupt, CacheFormatError):
            raise
        except Exception as e:
            raise CacheCorrupt(
                f"cache {self.path}, part {p.rank}, index rows {int(idx[0])}..{int(idx[-1])}: cannot read "
                f"({type(e).__name__}: {e}); run `kdcache verify` and re-dump the damaged part") from e

    def _read_rows(self, p: PartIndex, idx: np.ndarray) -> list[TeacherRecord]:
        settings = self.attrs["settings"]
        names = data_array_names(settings)
        kind = targets_of(settings)  # decodes the per-position targets
        slabs = self.read_slab(p.rank, idx, names)
        logical = {n: self._array(p.rank, n).attrs.get("logical_dtype")
                   for n in ("visual_hidden", "position_hidden", "visual_factor") if n in names}
        # targets hidden with visual rows not stored: rebuilt from the position rows in the span
        rebuild_visual = rebuilds_visual_hidden(settings)
        rel_err = p.cols.get("relation_error")  # [S] float32, relation lowrank:R only
        sids = self.sample_ids(p, idx)
        recs = []
        for j, i in enumerate(idx):
            parts = {}
            for name, (slab, starts) in slabs.items():
                o = int(starts[j])
                parts[name] = slab[o : o + int(p.length(AXIS_OF[name])[i])]
            if self.check:
                crc = sample_checksum(int(p.cols["row"][i]), sids[j], checksum_arrays(parts))
                if crc != int(p.cols["checksum"][i]):
                    raise CacheCorrupt(
                        f"sample {sids[j]!r} (row {int(p.cols['row'][i])}, part {p.rank}): "
                        "checksum mismatch; run `kdcache verify` and re-dump the damaged part"
                    )
            targets = kind.decode(parts, logical)  # topk_ids, topk_logprobs, tail_logmass (+ its own fields)
            if "visual_hidden" in parts:
                vis = hidden_from_storage(parts["visual_hidden"], logical["visual_hidden"])  # [N_vis, D]
            elif rebuild_visual:
                vis = targets["position_hidden"][self._span_rows(parts, sids[j], int(p.cols["row"][i]), p.rank)]
            else:
                vis = None
            recs.append(TeacherRecord(
                sample_id=sids[j],
                row=int(p.cols["row"][i]),
                input_ids=torch.from_numpy(parts["input_ids"]),
                roles=torch.from_numpy(parts["roles"]),
                positions=torch.from_numpy(parts["positions"]),
                kinds=torch.from_numpy(parts["kinds"]),
                **targets,
                visual_hidden=vis,
                visual_factor=(hidden_from_storage(parts["visual_factor"], logical["visual_factor"])
                               if "visual_factor" in parts else None),  # [N_vis, R]
                relation_error=float(rel_err[i]) if rel_err is not None else None,
            ))
        return recs

    @staticmethod
    def _span_rows(parts: dict, sid: str, row: int, rank: int) -> torch.Tensor:
        """Rows of ``positions`` inside the image span, in order (int64 [N_vis]): the visual
        positions, plus the last visual output when it predicts a response token (kind response).
        CacheCorrupt unless they are the whole span."""
        span = np.nonzero(parts["roles"] == ROLE_VISUAL)[0]  # [N_vis]
        rows = np.nonzero(np.isin(parts["positions"], span))[0]
        if not np.array_equal(parts["positions"][rows], span):
            raise CacheCorrupt(f"sample {sid!r} (row {row}, part {rank}): the distilled positions do not cover "
                               f"the image span ({len(rows)} of {len(span)} outputs), so visual_hidden cannot "
                               "be rebuilt from position_hidden; run `kdcache verify` and re-dump the part")
        return torch.from_numpy(rows)

    def get_by_row(self, row: int) -> TeacherRecord:
        """The committed ok sample of dataset row ``row`` (KeyError if absent or skipped)."""
        st = self._st()
        if st["by_row"] is None:
            st["by_row"] = {int(r): (rank, i) for rank, p in self.parts.items()
                            for i, r in enumerate(p.cols["row"])}
        if row not in st["by_row"]:
            raise KeyError(f"row {row} is not committed in cache {self.path}")
        rank, i = st["by_row"][row]
        p = self.parts[rank]
        status = int(p.cols["status"][i])
        if status != STATUS_OK:
            raise KeyError(f"row {row} was skipped by the dump: {REASON_NAMES.get(status, status)}")
        return self.read_rows(p, np.array([i]))[0]

    def __len__(self) -> int:
        return self.num_samples


# ---- order -----------------------------------------------------------------------------------
class EpochOrder:
    """The epoch's sample order as block arithmetic: a pure function of (part sizes, seed, epoch,
    block_size), never materialised.

    Blocks are contiguous ranges of ``block_size`` samples within a part (so a block is one slab
    read); the blocks are permuted with a generator seeded by (seed, epoch), and the samples inside
    block b with one seeded by (seed, epoch, b). Position g of the epoch lies in the permuted block
    found by one binary search over the blocks' ends, and that block's own permutation is drawn
    alone, so any position (a mid-epoch resume) is reached in O(blocks) numpy work and O(block)
    Python work, whatever the dataset size. Memory: three int64 arrays of the block count.
    """

    def __init__(self, part_sizes: list[int], seed: int, epoch: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.seed, self.epoch, self.block_size = int(seed), int(epoch), int(block_size)
        sizes = np.asarray(part_sizes, dtype=np.int64)
        per_part = -(-sizes // block_size)  # [parts] blocks per part
        part = np.repeat(np.arange(len(sizes)), per_part)  # [B] part position of each block
        first = np.cumsum(per_part) - per_part  # [parts] first block of each part
        start = (np.arange(len(part)) - first[part]) * block_size  # [B] first sample of each block
        length = np.minimum(block_size, sizes[part] - start)  # [B]
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(part))
        self.block_part, self.block_start, self.block_len = part[perm], start[perm], length[perm]
        self.block_id = perm  # the block's number before permuting: its inner permutation's seed
        self.ends = np.cumsum(self.block_len)  # [B] epoch position after each permuted block

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def block_of(self, g: int) -> int:
        """Index (in epoch order) of the block holding epoch position ``g``."""
        return int(np.searchsorted(self.ends, g, side="right"))

    def block(self, j: int) -> tuple[int, int, np.ndarray]:
        """(first epoch position, part position, sample indices in epoch order) of block ``j``."""
        n = int(self.block_len[j])
        inner = np.random.default_rng([self.seed, self.epoch, int(self.block_id[j])]).permutation(n)
        return int(self.ends[j]) - n, int(self.block_part[j]), int(self.block_start[j]) + inner


def rank_worker_blocks(order: EpochOrder, rank: int, world_size: int, start_sample: int = 0,
                       worker: int = 0, num_workers: int = 1, group: int = 1):
    """Lazily, block by block: (part position, sample indices) that DataLoader worker ``worker``
    of rank ``rank`` yields, in order, from sample ``start_sample`` of the rank's sequence on.

    The rank's sequence is every ``world_size``-th epoch position from ``rank``; from
    ``start_sample`` on its items go to workers in groups of ``group`` dealt round-robin
    (``worker_slice``). Equal to materialising ``rank_order(...)[start_sample:]`` and taking the
    worker's slice, without touching the blocks before ``start_sample``."""
    n = len(order)
    g0 = rank + start_sample * world_size  # first epoch position to serve
    if g0 >= n:
        return
    for j in range(order.block_of(g0), len(order.ends)):
        lo, part, idx = order.block(j)
        g = np.arange(max(lo, g0), lo + len(idx))  # [<= block] epoch positions of this block
        g = g[(g - rank) % world_size == 0]
        q = (g - rank) // world_size - start_sample  # position in the rank's sequence after the start
        g = g[(q // group) % num_workers == worker]
        if len(g):
            yield part, idx[g - lo]


def global_order(part_sizes: list[int], seed: int, epoch: int, block_size: int
                 ) -> list[tuple[int, int]]:
    """``EpochOrder`` materialised: (part position in ``part_sizes``, sample index within the
    part) pairs, a permutation of all samples (O(samples): for tests and small caches)."""
    order = EpochOrder(part_sizes, seed, epoch, block_size)
    out: list[tuple[int, int]] = []
    for j in range(len(order.ends)):
        _lo, p, idx = order.block(j)
        out += [(p, int(i)) for i in idx]
    return out


def rank_order(part_sizes, seed, epoch, block_size, rank, world_size) -> list[tuple[int, int]]:
    """This rank's sequence: every ``world_size``-th sample of ``global_order`` from ``rank``."""
    return global_order(part_sizes, seed, epoch, block_size)[rank::world_size]


def rank_count(n: int, rank: int, world_size: int, start_sample: int = 0) -> int:
    """Items of rank ``rank``'s sequence over ``n`` epoch positions, after ``start_sample``."""
    return max(0, len(range(rank, n, world_size)) - start_sample)


def worker_slice(n: int, worker: int, num_workers: int, group: int) -> list[int]:
    """Positions of a rank's sequence (length n) served by ``worker``: groups of ``group``
    consecutive items dealt round-robin, so a DataLoader with ``batch_size=group`` (which yields
    the workers' batches round-robin, in order) reproduces the rank's sequence exactly."""
    return [i for g in range(worker * group, n, num_workers * group)
            for i in range(g, min(g + group, n))]


class CacheDataset(torch.utils.data.IterableDataset):
    """Stream committed samples in ``global_order``, split over (rank, DataLoader worker).

    Rank ``rank`` takes every ``world_size``-th sample of the global order; ``start_sample``
    skips the first N of that rank's sequence (mid-epoch resume: resume state is just
    (epoch, samples consumed)). The rest is dealt to workers in groups of ``batch_size`` (set it
    to the DataLoader's batch_size) so the order seen through a DataLoader is the same for any
    ``num_workers``. On entering a block a worker reads its own samples of it (``read_rows``: the
    narrow arrays over the block's span in one call each, the wide ones -- hidden states,
    factors -- sample run by sample run) and yields ``transform(record)`` (or the record).

    Cost to know: the narrow arrays (ids, top-k) of a block are read by every (rank, worker)
    with a sample in it, i.e. ``world_size * num_workers`` times per epoch; the hidden states,
    most of the bytes, once.
    """

    def __init__(self, path, *, seed: int, epoch: int = 0, block_size: int = 64, rank: int = 0,
                 world_size: int = 1, start_sample: int = 0,
                 transform: Callable[[TeacherRecord], object] | None = None,
                 batch_size: int = 1, check: bool = True, cache_dir: str | os.PathLike | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.reader = CacheReader(path, check=check, cache_dir=cache_dir)
        self.seed, self.epoch, self.block_size = seed, epoch, block_size
        self.rank, self.world_size = rank, world_size
        self.start_sample = start_sample
        self.transform = transform
        self.batch_size = batch_size

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Move to ``epoch`` (from ``start_sample`` of this rank's sequence)."""
        self.epoch, self.start_sample = epoch, start_sample

    def order(self) -> list[tuple[int, int]]:
        """(part rank, sample index) pairs this rank yields from ``start_sample`` on
        (materialised: O(samples); iteration never builds it)."""
        ranks = self.reader.part_ranks
        return [(ranks[p], int(i)) for p, idx in rank_worker_blocks(self._epoch_order(), self.rank,
                                                                    self.world_size, self.start_sample)
                for i in idx]

    def _epoch_order(self) -> EpochOrder:
        return EpochOrder(self.reader.part_sizes, self.seed, self.epoch, self.block_size)

    def __len__(self) -> int:
        return rank_count(self.reader.num_samples, self.rank, self.world_size, self.start_sample)

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ranks = self.reader.part_ranks
        # block by block: this worker's samples of a block are read together when it enters it
        blocks = rank_worker_blocks(self._epoch_order(), self.rank, self.world_size, self.start_sample,
                                    worker, nw, self.batch_size)
        cur = next(blocks, None)
        while cur is not None:
            nxt = next(blocks, None)
            if nxt is not None:  # read-ahead (URL caches): the next block's objects while this one decodes
                pn = self.reader.parts[ranks[nxt[0]]]
                self.reader.prefetch_rows(pn, pn.ok[np.unique(nxt[1])])
            part, idx = cur
            p = self.reader.parts[ranks[part]]
            rows = np.unique(idx)
            recs = dict(zip(rows.tolist(), self.reader.read_rows(p, p.ok[rows])))
            for i in idx.tolist():
                rec = recs[i]
                yield self.transform(rec) if self.transform is not None else rec
            cur = nxt
