"""Reader round trips, multi-part caches, pickling, global order and the DataLoader contract."""

from __future__ import annotations

import pickle

import pytest
import torch

from kdcache.cache import CacheDataset, CacheReader, CacheWriter, global_order
from kdcache.cache.reader import EpochOrder, rank_count, rank_order, rank_worker_blocks, worker_slice

from .helpers import SMALL, make_attrs_for, make_record, records_equal, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("cache") / "c"
    write_cache(path, records, skips=[(100, "bad-1", "no_response"), (101, "bad-2", 7)])
    return path


def test_round_trip_exact(cache, records):
    r = CacheReader(cache)
    assert r.num_samples == 40 and len(r) == 40
    got = r.read_range(0, 0, 40)
    assert len(got) == 40
    for a, b in zip(records, got):
        records_equal(a, b)
    assert got[0].visual_hidden.dtype == torch.bfloat16
    assert got[0].topk_logprobs.dtype == torch.float16
    # sub-ranges and by-row access give the same records
    for a, b in zip(records[13:17], r.read_range(0, 13, 17)):
        records_equal(a, b)
    records_equal(r.get_by_row(21), records[21])
    with pytest.raises(KeyError, match="skipped by the dump: no_response"):
        r.get_by_row(100)
    with pytest.raises(KeyError, match="not committed"):
        r.get_by_row(999)
    assert r.rows() == list(range(40))
    assert r.skipped() == [(100, "bad-1", "no_response"), (101, "bad-2", "too_long")]


@pytest.mark.parametrize("wide_bytes", [1, 1 << 40])  # wide arrays run by run / everything in one span
def test_sparse_rows_read_only_what_they_need_and_equal_the_dense_read(cache, records, monkeypatch, wide_bytes):
    """What a DataLoader worker does: its own, scattered samples of a block."""
    import numpy as np

    from kdcache.cache import reader as reader_mod

    monkeypatch.setattr(reader_mod, "WIDE_READ_BYTES", wide_bytes)
    r = CacheReader(cache)
    p = r.parts[0]
    want = [3, 4, 9, 17, 18, 19, 33]
    got = r.read_rows(p, p.ok[np.asarray(want)])
    for i, b in zip(want, got):
        records_equal(records[i], b)


@pytest.mark.parametrize("hidden", ["fp16", "float32", "none"])
def test_round_trip_other_hidden_modes(tmp_path, hidden):
    recs = [make_record(i, hidden="float32" if hidden != "none" else "none") for i in range(5)]
    write_cache(tmp_path / "c", recs, attrs=make_attrs_for(hidden=hidden, logprob_dtype="float32"))
    got = CacheReader(tmp_path / "c").read_range(0, 0, 5)
    for a, b in zip(recs, got):
        assert torch.equal(a.topk_logprobs.float(), b.topk_logprobs)  # float32 stored exactly
        if hidden == "none":
            assert b.visual_hidden is None
        else:
            want = a.visual_hidden.to(torch.float16 if hidden == "fp16" else torch.float32)
            assert b.visual_hidden.dtype == want.dtype and torch.equal(b.visual_hidden, want)


def test_two_parts_open_as_one(tmp_path, records):
    path = tmp_path / "c"
    attrs = make_attrs_for(world_size=2)
    w0 = write_cache(path, records[0::2], attrs=attrs, rank=0, world_size=2)
    write_cache(path, records[1::2], attrs=attrs, rank=1, world_size=2)
    r = CacheReader(path)
    assert r.part_ranks == [0, 1] and r.part_sizes == [20, 20] and r.num_samples == 40
    assert sorted(r.rows()) == list(range(40))
    for a, b in zip(records[1::2][5:9], r.read_range(1, 5, 9)):
        records_equal(a, b)
    records_equal(r.get_by_row(7), records[7])
    assert w0.is_finished()


def test_reader_is_picklable_and_reopens_lazily(cache, records):
    r = CacheReader(cache)
    r.read_range(0, 0, 2)  # opens zarr arrays in this process
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._state is None
    records_equal(r2.read_range(0, 3, 4)[0], records[3])


def test_reader_of_a_cache_being_written(tmp_path, records):
    path = tmp_path / "c"
    w = CacheWriter(path, make_attrs_for(), layout=SMALL)
    for rec in records[:3]:
        w.add(rec)
    r = CacheReader(path)
    assert w.buffered() == 3 and r.num_samples == 0
    w.flush()
    assert r.num_samples == 0  # a snapshot until refresh
    r.refresh()
    assert r.num_samples == 3
    for rec in records[3:5]:
        w.add(rec)
    r.refresh()
    assert w.buffered() == 2 and r.num_samples == 3 and r.rows() == [0, 1, 2]
    w.close()


# ---- order -----------------------------------------------------------------------------------
SIZES = [23, 0, 17, 40]


def test_global_order_is_a_deterministic_blocked_permutation():
    a = global_order(SIZES, seed=3, epoch=1, block_size=8)
    assert a == global_order(SIZES, seed=3, epoch=1, block_size=8)
    assert sorted(a) == [(p, i) for p, n in enumerate(SIZES) for i in range(n)]
    assert a != global_order(SIZES, seed=3, epoch=2, block_size=8)
    assert a != global_order(SIZES, seed=4, epoch=1, block_size=8)
    # each block (part, i // 8) occupies one contiguous run of the sequence
    blocks = [(p, i // 8) for p, i in a]
    runs = [b for j, b in enumerate(blocks) if j == 0 or blocks[j - 1] != b]
    assert len(runs) == len(set(runs)) == sum(-(-n // 8) for n in SIZES)
    # samples are shuffled inside blocks
    assert [i for p, i in a if p == 3 and i < 8] != list(range(8))


def test_rank_and_worker_splits_are_disjoint_and_covering():
    full = global_order(SIZES, 0, 0, 8)
    seen = []
    for rank in range(3):
        seq = rank_order(SIZES, 0, 0, 8, rank, 3)
        assert seq == full[rank::3]
        for group in (1, 4):
            slices = [worker_slice(len(seq), w, 2, group) for w in range(2)]
            assert sorted(slices[0] + slices[1]) == list(range(len(seq)))
        seen += seq
    assert sorted(seen) == sorted(full)


@pytest.mark.parametrize("world,nw,group", [(1, 1, 1), (3, 2, 4), (2, 3, 1), (4, 1, 5)])
def test_lazy_blocks_equal_the_materialised_slices_from_any_start(world, nw, group):
    """Resuming at sample N serves exactly what skipping the first N of the materialised rank
    sequence serves, for every worker (the lazy path never builds the sequence)."""
    for rank in range(world):
        seq = rank_order(SIZES, 7, 2, 8, rank, world)
        for start in (0, 1, 5, len(seq) - 1, len(seq), len(seq) + 3):
            assert rank_count(sum(SIZES), rank, world, start) == max(0, len(seq) - start)
            tail = seq[start:]
            for w in range(nw):
                want = [tail[j] for j in worker_slice(len(tail), w, nw, group)]
                got = [(p, int(i)) for p, idx in rank_worker_blocks(EpochOrder(SIZES, 7, 2, 8), rank, world,
                                                                    start, w, nw, group) for i in idx]
                assert got == want, (rank, start, w)


def test_epoch_order_reaches_a_late_position_without_the_earlier_blocks():
    order = EpochOrder([1_000_000, 3], seed=0, epoch=0, block_size=64)
    assert len(order) == 1_000_003 and len(order.ends) == 15_626
    g = 987_654
    j = order.block_of(g)
    lo, part, idx = order.block(j)
    assert lo <= g < lo + len(idx) and ((part == 0 and len(idx) == 64) or (part == 1 and len(idx) == 3))
    first = next(rank_worker_blocks(order, rank=0, world_size=1, start_sample=g))
    assert first[0] == part and list(first[1]) == list(idx[g - lo:])


def test_dataset_start_sample_gives_the_tail(cache):
    ds = CacheDataset(cache, seed=1, block_size=8, rank=1, world_size=2,
                      transform=lambda r: r.sample_id)
    full = list(ds)
    assert len(full) == len(ds) == 20
    ds2 = CacheDataset(cache, seed=1, block_size=8, rank=1, world_size=2, start_sample=7,
                       transform=lambda r: r.sample_id)
    assert list(ds2) == full[7:]
    other = CacheDataset(cache, seed=1, block_size=8, rank=0, world_size=2,
                         transform=lambda r: r.sample_id)
    assert sorted(full + list(other)) == [f"s{i:05d}" for i in range(40)]
    ds.set_epoch(1)
    epoch1 = list(ds)
    assert len(epoch1) == 20 and epoch1 != full


def sample_id(rec):
    return rec.sample_id


def collate_ids(batch):
    return [sample_id(r) for r in batch]


@pytest.mark.parametrize("batch_size", [None, 3])
def test_dataloader_order_independent_of_num_workers(cache, batch_size):
    def run(num_workers):
        ds = CacheDataset(cache, seed=5, block_size=8, rank=0, world_size=1,
                          batch_size=batch_size or 1, start_sample=2,
                          transform=None if batch_size else sample_id)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_ids if batch_size else None)
        out = []
        for b in dl:
            out += b if batch_size else [b]
        return out

    serial = run(0)
    assert len(serial) == 38
    assert run(2) == serial
    assert serial == [f"s{i:05d}" for _, i in rank_order([40], 5, 0, 8, 0, 1)[2:]]
