"""The cache as an Arrow table (one row per distilled position) and as Parquet.

Columns: sample_id string, row int64, position int32, kind dictionary<int8, string>,
target_token int32 (= input_ids[position + 1], the token the output at ``position`` predicts),
topk_ids fixed_size_list<int32>[k], topk_logprobs fixed_size_list<float16|float32>[k],
tail_logmass float32, and for ``targets: sampled:N`` sample_counts fixed_size_list<uint16>[N]
(draws per id; padding columns have id 0, log-prob -inf, count 0). ``targets: topp:P[,K]`` gives
topk_ids / topk_logprobs as variable-length lists: each position's kept ids only. The cache's root attributes
travel as schema metadata ``kdcache_attrs``. SQL engines without a float16 type (DuckDB's Arrow
scan) take ``to_arrow(path, float16=False)``: the same values widened to float32, exactly; DuckDB
reads the Parquet export's Float16 column as is. Hidden states (visual_hidden, and position_hidden of
``targets: hidden``) are not exported: they are D floats per row, for the trainer, not for tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from kdcache.cache.format import data_array_names
from kdcache.cache.reader import CacheReader
from kdcache.cache.store import cache_location
from kdcache.positions import KIND_NAMES

KIND_DICTIONARY = pa.array([KIND_NAMES[i] for i in range(len(KIND_NAMES))], type=pa.string())


def arrow_schema(k: int, logprob_dtype: str, attrs: dict | None = None, *, sample_counts: bool = False,
                 ragged: bool = False) -> pa.Schema:
    """The table's schema; ``sample_counts`` adds that column (targets sampled:N, k = N); ``ragged``:
    the ids and log-probs as variable-length lists (targets topp: the kept ids, at most k)."""
    width = -1 if ragged else k  # pyarrow: list_size -1 is a variable-length list
    lp_type = pa.float16() if logprob_dtype == "float16" else pa.float32()
    fields = [
        pa.field("sample_id", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("kind", pa.dictionary(pa.int8(), pa.string())),
        pa.field("target_token", pa.int32()),
        pa.field("topk_ids", pa.list_(pa.int32(), width)),
        pa.field("topk_logprobs", pa.list_(lp_type, width)),
        pa.field("tail_logmass", pa.float32()),
    ]
    if sample_counts:
        fields.append(pa.field("sample_counts", pa.list_(pa.uint16(), k)))
    meta = {"kdcache_attrs": json.dumps(attrs, sort_keys=True)} if attrs is not None else None
    return pa.schema(fields, metadata=meta)


SLAB_ARRAYS = ("input_ids", "positions", "kinds", "topk_ids", "topk_logprobs", "tail_logmass")


def _batch(reader: CacheReader, p, idx: np.ndarray, schema: pa.Schema, k: int) -> pa.RecordBatch:
    """The rows of index rows ``idx`` (ascending, ok samples) of part ``p``, built from whole slabs:
    one zarr read per exported array and numpy gathers, never a Python step per sample or
    position. Only the exported arrays are read (not the hidden states, most of a cache's bytes),
    so the per-sample checksum, which covers them all, is ``kdcache verify``'s job here; a damaged
    chunk still fails its own crc32c on decode."""
    counts = schema.get_field_index("sample_counts") >= 0
    slabs = reader.read_slab(p.rank, idx, list(SLAB_ARRAYS) + (["sample_counts"] if counts else []))
    npos = p.length("positions")[idx].astype(np.int64)  # [S]
    P = int(npos.sum())
    sample = np.repeat(np.arange(len(idx)), npos)  # [P] which sample each row belongs to
    first = np.cumsum(npos) - npos  # [S] its first row in the batch
    within = np.arange(P) - first[sample]  # [P] row index inside its sample

    def rows_of(name):  # [P, ...] the samples' rows of a position array, back to back
        slab, starts = slabs[name]
        return slab[starts[sample] + within]

    pos = rows_of("positions").astype(np.int32)  # [P]
    tok_slab, tok_starts = slabs["input_ids"]
    target = tok_slab[tok_starts[sample] + pos + 1]  # [P] the token the output at pos predicts
    lp_type = schema.field("topk_logprobs").type.value_type
    tlp = rows_of("topk_logprobs").astype(lp_type.to_pandas_dtype(), copy=False).reshape(-1)  # [P * k]; float16 -> float32 is exact
    tid = rows_of("topk_ids").astype(np.int32).reshape(-1)  # [P * k]
    if isinstance(schema.field("topk_ids").type, pa.FixedSizeListType):
        ids_col = pa.FixedSizeListArray.from_arrays(pa.array(tid, type=pa.int32()), k)
        lps_col = pa.FixedSizeListArray.from_arrays(pa.array(tlp, type=lp_type), k)
    else:  # a nucleus: the kept (finite) columns of each position, padding dropped
        kept = np.isfinite(tlp)  # [P * k]
        offsets = pa.array(np.concatenate([[0], np.cumsum(kept.reshape(-1, k).sum(1))]).astype(np.int32))
        ids_col = pa.ListArray.from_arrays(offsets, pa.array(tid[kept], type=pa.int32()))
        lps_col = pa.ListArray.from_arrays(offsets, pa.array(tlp[kept], type=lp_type))
    sids = pa.array(reader.sample_ids(p, idx), type=pa.string()).take(pa.array(sample))
    cols = [
        sids,
        pa.array(np.repeat(p.cols["row"][idx].astype(np.int64), npos), type=pa.int64()),
        pa.array(pos, type=pa.int32()),
        pa.DictionaryArray.from_arrays(pa.array(rows_of("kinds").astype(np.int8), type=pa.int8()), KIND_DICTIONARY),
        pa.array(target.astype(np.int32), type=pa.int32()),
        ids_col,
        lps_col,
        pa.array(rows_of("tail_logmass").astype(np.float32), type=pa.float32()),
    ]
    if counts:
        c = rows_of("sample_counts").astype(np.uint16).reshape(-1)  # [P * N]
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(c, type=pa.uint16()), k))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _record_batch(records, schema: pa.Schema, k: int) -> pa.RecordBatch:
    """The batch from decoded records: for target kinds whose stored arrays are not the top-k ones
    (``_batch`` reads those directly)."""
    n = [int(r.positions.shape[0]) for r in records]
    pos = np.concatenate([r.positions.numpy() for r in records]).astype(np.int32)  # [P]
    kinds = np.concatenate([r.kinds.numpy() for r in records]).astype(np.int8)  # [P]
    target = np.concatenate([r.input_ids.numpy()[r.positions.numpy() + 1] for r in records])
    tid = np.concatenate([r.topk_ids.numpy() for r in records]).reshape(-1)  # [P * k]
    tlp = np.concatenate([r.topk_logprobs.numpy() for r in records]).reshape(-1)  # [P * k]
    tail = np.concatenate([r.tail_logmass.numpy() for r in records]).astype(np.float32)  # [P]
    sids = np.repeat(np.array([r.sample_id for r in records], dtype=object), n)
    rows = np.repeat(np.array([r.row for r in records], dtype=np.int64), n)
    lp_type = schema.field("topk_logprobs").type.value_type
    tlp = tlp.astype(lp_type.to_pandas_dtype(), copy=False)  # float16 -> float32 is exact
    if isinstance(schema.field("topk_ids").type, pa.FixedSizeListType):
        ids_col = pa.FixedSizeListArray.from_arrays(pa.array(tid.astype(np.int32), type=pa.int32()), k)
        lps_col = pa.FixedSizeListArray.from_arrays(pa.array(tlp, type=lp_type), k)
    else:  # a nucleus: the kept (finite) columns of each position, padding dropped
        kept = np.isfinite(tlp)  # [P * k]
        offsets = pa.array(np.concatenate([[0], np.cumsum(kept.reshape(-1, k).sum(1))]).astype(np.int32))
        ids_col = pa.ListArray.from_arrays(offsets, pa.array(tid[kept].astype(np.int32), type=pa.int32()))
        lps_col = pa.ListArray.from_arrays(offsets, pa.array(tlp[kept], type=lp_type))
    cols = [
        pa.array(sids, type=pa.string()),
        pa.array(rows, type=pa.int64()),
        pa.array(pos, type=pa.int32()),
        pa.DictionaryArray.from_arrays(pa.array(kinds, type=pa.int8()), KIND_DICTIONARY),
        pa.array(target.astype(np.int32), type=pa.int32()),
        ids_col,
        lps_col,
        pa.array(tail, type=pa.float32()),
    ]
    if schema.get_field_index("sample_counts") >= 0:
        counts = np.concatenate([r.sample_counts.numpy() for r in records]).reshape(-1)  # [P * N]
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(counts.astype(np.uint16), type=pa.uint16()), k))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def iter_batches(path: str | os.PathLike, sample_ids: Iterable[str] | None = None,
                 block: int = 256, *, float16: bool = True) -> tuple[pa.Schema, Iterable[pa.RecordBatch]]:
    """(schema, record batches of ``block`` samples) of the committed ok samples; ``float16=False``
    widens float16 log-probs to float32 (for engines without float16)."""
    reader = CacheReader(path)
    k = reader.k
    names = data_array_names(reader.attrs["settings"])
    lp_dtype = reader.attrs["settings"]["logprob_dtype"] if float16 else "float32"
    schema = arrow_schema(k, lp_dtype, reader.attrs, sample_counts="sample_counts" in names,
                          ragged="topp_counts" in names)
    wanted = set(sample_ids) if sample_ids is not None else None
    slabs = set(SLAB_ARRAYS) <= set(names)  # the top-k arrays are stored as such: gather them directly

    def gen():
        for p in reader.parts.values():
            idx = p.ok
            if wanted is not None and len(idx):
                ids = reader.sample_ids(p, idx)
                idx = idx[np.array([s in wanted for s in ids], dtype=bool)]
            for s in range(0, len(idx), block):
                if slabs:
                    yield _batch(reader, p, idx[s : s + block], schema, k)
                elif recs := reader.read_rows(p, idx[s : s + block]):
                    yield _record_batch(recs, schema, k)

    return schema, gen()


def to_arrow(path: str | os.PathLike, sample_ids: Iterable[str] | None = None, *, float16: bool = True
             ) -> pa.Table:
    """One row per distilled position of the committed ok samples (optionally only
    ``sample_ids``), in part then commit order. ``float16=False``: float16 log-probs widened to
    float32 (exact), for SQL engines without float16 such as DuckDB."""
    schema, batches = iter_batches(path, sample_ids, float16=float16)
    return pa.Table.from_batches(list(batches), schema=schema)


def export_parquet(path: str | os.PathLike, out_path: str | os.PathLike,
                   sample_ids: Iterable[str] | None = None) -> int:
    """Write the table of ``to_arrow`` to Parquet batch by batch (float16 log-probs are stored
    with Parquet's Float16 logical type, pyarrow >= 15). Returns the number of rows written.
    ``out_path``: a file path or a URL (``cache_location``; a ``CacheLocation`` carries its
    storage options)."""
    import pyarrow.parquet as pq

    out = cache_location(out_path, what="Parquet output")
    schema, batches = iter_batches(path, sample_ids)
    n = 0
    if out.is_local:
        sink = None
        where = out.path
    else:  # one object, uploaded as it is written (S3: a multipart upload that appears whole on close)
        fs, _ = out.fs()
        sink = fs.open(out.path, "wb")
        where = sink
    try:
        with pq.ParquetWriter(where, schema, compression="zstd") as w:
            for b in batches:
                w.write_batch(b)
                n += b.num_rows
    except BaseException:
        if sink is not None:  # abort the upload: no half-written object under the name
            (getattr(sink, "discard", None) or sink.close)()
        raise
    if sink is not None:
        sink.close()
    return n
