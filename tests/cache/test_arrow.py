"""Arrow table / Parquet export, and cache_stats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcache.cache.arrow import export_parquet, to_arrow
from kdcache.cache.stats import cache_stats
from kdcache.positions import KIND_NAMES

from .helpers import make_attrs_for, make_record, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("arrow") / "c"
    write_cache(path, records[:12], skips=[(50, "skipped-1", "too_long")])
    return path


def test_table_rows_and_values(cache, records):
    t = to_arrow(cache)
    recs = records[:12]
    assert t.num_rows == sum(int(r.positions.shape[0]) for r in recs)
    assert t.schema.field("topk_ids").type == pa.list_(pa.int32(), 8)
    assert t.schema.field("topk_logprobs").type == pa.list_(pa.float16(), 8)
    assert t.schema.field("kind").type == pa.dictionary(pa.int8(), pa.string())
    assert b"kdcache_attrs" in t.schema.metadata
    sid = t.column("sample_id").to_pylist()
    assert sid == [r.sample_id for r in recs for _ in range(int(r.positions.shape[0]))]
    rows = t.column("row").to_numpy()
    pos = t.column("position").to_numpy()
    kind = t.column("kind").to_pylist()
    target = t.column("target_token").to_numpy()
    tid = np.stack(t.column("topk_ids").to_numpy(zero_copy_only=False))
    tlp = np.stack(t.column("topk_logprobs").to_numpy(zero_copy_only=False))
    tail = t.column("tail_logmass").to_numpy()
    ids = np.concatenate([r.input_ids.numpy()[r.positions.numpy() + 1] for r in recs])
    assert np.array_equal(rows, np.repeat([r.row for r in recs], [len(r.positions) for r in recs]))
    assert np.array_equal(pos, np.concatenate([r.positions.numpy() for r in recs]))
    assert kind == [KIND_NAMES[int(k)] for r in recs for k in r.kinds]
    assert np.array_equal(target, ids)
    assert np.array_equal(tid, np.concatenate([r.topk_ids.numpy() for r in recs]))
    assert tlp.dtype == np.float16
    assert np.array_equal(tlp, np.concatenate([r.topk_logprobs.numpy() for r in recs]))
    assert np.array_equal(tail, np.concatenate([r.tail_logmass.numpy() for r in recs]))


def test_table_for_selected_samples(cache, records):
    t = to_arrow(cache, sample_ids=["s00003", "s00007", "nope"])
    assert set(t.column("sample_id").to_pylist()) == {"s00003", "s00007"}
    assert t.num_rows == len(records[3].positions) + len(records[7].positions)


def test_parquet_round_trip_keeps_float16(cache, tmp_path):
    out = tmp_path / "c.parquet"
    n = export_parquet(cache, out)
    t = to_arrow(cache)
    back = pq.read_table(out)
    assert n == t.num_rows == back.num_rows
    assert back.schema.field("topk_logprobs").type == pa.list_(pa.float16(), 8)
    leaves = pq.ParquetFile(out).schema
    lp = [leaves.column(i) for i in range(len(leaves))
          if leaves.column(i).path.startswith("topk_logprobs")]
    assert [c.logical_type.type for c in lp] == ["FLOAT16"]
    for name in t.column_names:
        assert back.column(name).to_pylist() == t.column(name).to_pylist(), name


def test_float32_logprobs_table(tmp_path):
    recs = [make_record(i) for i in range(3)]
    write_cache(tmp_path / "c", recs, attrs=make_attrs_for(logprob_dtype="float32"))
    t = to_arrow(tmp_path / "c")
    assert t.schema.field("topk_logprobs").type == pa.list_(pa.float32(), 8)


def test_cache_stats(cache, records):
    s = cache_stats(cache)
    recs = records[:12]
    assert s["samples"] == 12 and s["skipped"] == {"too_long": 1} and s["k"] == 8
    assert s["teacher"] == "tiny-teacher"
    assert s["tokens"] == sum(r.num_tokens for r in recs)
    kinds = np.concatenate([r.kinds.numpy() for r in recs])
    assert s["positions"] == {KIND_NAMES[c]: int((kinds == c).sum()) for c in KIND_NAMES}
    assert s["bytes"]["topk_logprobs"] > 0 and s["bytes_per_sample"] > s["bytes_per_position"]
    tail = np.concatenate([r.tail_logmass.numpy() for r in recs]).astype(np.float64)
    vis = kinds == 1
    assert s["kept_mass"]["visual"]["mean"] == pytest.approx(np.mean(1 - np.exp(tail[vis])))
    assert 0 <= s["kept_mass"]["response"]["p5"] <= s["kept_mass"]["response"]["p95"] <= 1
    resp = [(r.topk_ids.numpy()[r.kinds.numpy() == 2, 0],
             r.input_ids.numpy()[r.positions.numpy()[r.kinds.numpy() == 2] + 1]) for r in recs]
    acc = np.concatenate([a == b for a, b in resp]).mean()
    assert s["top1_accuracy_response"] == pytest.approx(acc)
    assert 0 < s["mean_entropy_k1"] <= np.log(9) + 1e-6


def test_duckdb_runs_the_readme_query_on_the_float32_view_and_the_parquet(cache, tmp_path):
    """The README's snippet: DuckDB cannot scan Arrow float16, so it gets ``float16=False`` (the same
    values, widened exactly) or the Parquet export (Float16 logical type, which it reads)."""
    import duckdb  # in the test extra
    t16 = to_arrow(cache)
    t = to_arrow(cache, float16=False)
    assert t.schema.field("topk_logprobs").type == pa.list_(pa.float32(), 8)
    np.testing.assert_array_equal(np.stack(t.column("topk_logprobs").to_numpy(zero_copy_only=False)),
                                  np.stack(t16.column("topk_logprobs").to_numpy(zero_copy_only=False)).astype(np.float32))
    query = "select kind, avg(1 - exp(tail_logmass)) as kept from {} group by kind order by kind"
    got = duckdb.sql(query.format("t")).fetchall()
    tail = t16.column("tail_logmass").to_numpy()
    kinds = np.array(t16.column("kind").to_pylist())
    want = [(k, float(np.mean(1 - np.exp(tail[kinds == k].astype(np.float64))))) for k in sorted(set(kinds))]
    assert [k for k, _ in got] == [k for k, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    pq_path = tmp_path / "t.parquet"
    export_parquet(cache, pq_path)
    assert duckdb.sql(query.format(f"'{pq_path}'")).fetchall() == got
    first = duckdb.sql(f"select topk_logprobs from '{pq_path}' limit 1").fetchall()[0][0]
    assert first == t.column("topk_logprobs")[0].as_py()


def test_slab_batches_equal_the_records_for_scattered_samples_and_small_blocks(cache, records):
    """The batches are gathered from slabs spanning other samples' rows (a selection with gaps),
    over several blocks: every column equals the records' own values."""
    from kdcache.cache.arrow import iter_batches

    chosen = [records[i] for i in (0, 2, 3, 7, 8, 11)]
    schema, batches = iter_batches(cache, sample_ids=[r.sample_id for r in chosen], block=4)
    batches = list(batches)
    assert len(batches) == 2
    t = pa.Table.from_batches(batches, schema=schema)
    n = [len(r.positions) for r in chosen]
    assert t.column("sample_id").to_pylist() == [r.sample_id for r, m in zip(chosen, n) for _ in range(m)]
    assert np.array_equal(t.column("row").to_numpy(), np.repeat([r.row for r in chosen], n))
    assert np.array_equal(t.column("position").to_numpy(), np.concatenate([r.positions.numpy() for r in chosen]))
    assert t.column("kind").to_pylist() == [KIND_NAMES[int(k)] for r in chosen for k in r.kinds]
    target = np.concatenate([r.input_ids.numpy()[r.positions.numpy() + 1] for r in chosen])
    assert np.array_equal(t.column("target_token").to_numpy(), target)
    tid = np.stack(t.column("topk_ids").to_numpy(zero_copy_only=False))
    tlp = np.stack(t.column("topk_logprobs").to_numpy(zero_copy_only=False))
    assert np.array_equal(tid, np.concatenate([r.topk_ids.numpy() for r in chosen]))
    assert np.array_equal(tlp, np.concatenate([r.topk_logprobs.numpy() for r in chosen]))
    assert np.array_equal(t.column("tail_logmass").to_numpy(), np.concatenate([r.tail_logmass.numpy() for r in chosen]))
