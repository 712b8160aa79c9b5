"""Target kinds (``kdcache.target_kinds``): the registry's spellings, and the nucleus kind ``topp:P[,K]``
end to end -- a real dump of the tiny teacher stored ragged, read back padded, verified (and its
damage caught), smaller than top-K where the nucleus is short, and trained on: at P = 1, K = V it
is the full distribution, so training on it equals online KD with the teacher in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from kdcache.cache.format import AXIS_OF, checksum_arrays, data_array_names, index_arrays, sample_checksum
from kdcache.cache.reader import CacheReader
from kdcache.cache.verify import verify_cache
from kdcache.target_kinds import TARGET_KINDS, Exact, Sampled, Topk, Topp, parse_targets
from tests.helpers import dump_small
from tests.test_train import make_cfg, read_metrics, vocab_size
from tests.test_train_targets import _assert_same_run, _run

K = 32
P = 0.05  # the random tiny teacher is flat: its top 32 hold ~10% of the mass, so P = 5% keeps about half


def test_the_registry_parses_every_kind_and_names_the_forms():
    assert [parse_targets(s) for s in ("topk", "hidden", "sampled:8", "topp:0.99", "topp:0.9,128")] == [
        Topk(), Exact(), Sampled(8), Topp(0.99, None), Topp(0.9, 128)]
    assert set(TARGET_KINDS) == {"topk", "hidden", "sampled", "topp"}
    assert Topp(0.9, 128).spec == "topp:0.9,128" and Topp(0.9, None).top_k(64) == 64
    assert Topp(0.9, None).bound({"top_k": 48}) == Topp(0.9, 48)
    for bad in ("topp:0", "topp:1.5", "topp:x", "topp:0.9,0", "topp:0.9,07", "topp:0.9,70000", "topp:nan"):
        with pytest.raises(ValueError, match=r"topp:P\[,K\] with 0 < P <= 1"):
            parse_targets(bad)
    with pytest.raises(ValueError, match="is not a target mode .*topk, hidden, sampled:N .*topp:P"):
        parse_targets("nucleus")


@pytest.fixture(scope="module")
def caches(tmp_path_factory, synth_data, tiny_teacher):
    root = tmp_path_factory.mktemp("topp_caches")
    V = vocab_size(tiny_teacher)
    return {"topp": dump_small(tiny_teacher, synth_data, root / "topp.zarr", targets=f"topp:{P},{K}"),
            "topk": dump_small(tiny_teacher, synth_data, root / "topk.zarr", top_k=K),
            "full": dump_small(tiny_teacher, synth_data, root / "full.zarr", targets=f"topp:1.0,{V}",
                               hidden="float32", logprob_dtype="float32")}


def test_topp_cache_is_ragged_reads_back_padded_and_verifies(caches):
    path = caches["topp"]
    rep = verify_cache(path)
    assert rep.ok and rep.samples_checked == 20, str(rep)
    st = CacheReader(path).attrs["settings"]
    assert st["targets"] == f"topp:{P},{K}" and st["top_k"] == K
    assert {"topp_counts", "topp_ids", "topp_logprobs"} <= set(data_array_names(st))
    assert "topk_ids" not in data_array_names(st) and {"entry_offset", "num_entries"} <= set(index_arrays(st))
    topp, topk = CacheReader(path).read_range(0, 0, 20), CacheReader(caches["topk"]).read_range(0, 0, 20)
    n_kept = []
    for a, b in zip(topp, topk):  # the same teacher: the nucleus is a prefix of its top-K
        kept = torch.isfinite(a.topk_logprobs)
        c = kept.sum(1)
        n_kept.append(c)
        assert a.topk_ids.shape == b.topk_ids.shape == (len(a.positions), K)
        assert torch.equal(a.topk_ids[kept], b.topk_ids[kept]) and torch.equal(a.topk_logprobs[kept], b.topk_logprobs[kept])
        mass = b.topk_logprobs.double().exp().cumsum(1)  # [P, K] from float16 log-probs: ~1e-3 relative
        kept_mass = mass.gather(1, (c - 1).unsqueeze(1)).squeeze(1)
        before = torch.where(c > 1, mass.gather(1, (c - 2).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
        assert ((kept_mass >= P * (1 - 2e-3)) | (c == K)).all() and (before < P * (1 + 2e-3)).all()
        # the tail: the top-K tail plus the dropped ids' mass, exactly
        dropped = torch.logsumexp(b.topk_logprobs.float().masked_fill(kept, float("-inf")), 1)
        torch.testing.assert_close(a.tail_logmass, torch.logaddexp(b.tail_logmass, dropped), atol=2e-3, rtol=0)
    counts = torch.cat(n_kept).float()
    assert 1 < counts.mean() < K / 2
    n_entries = zarr.open_array(str(path / "parts/0/topp_ids"), mode="r").shape[0]
    assert n_entries == int(counts.sum())


def test_topp_stores_fewer_bytes_than_topk_where_the_nucleus_is_short(caches):
    def nbytes(path, names):
        return sum(f.stat().st_size for n in names for f in (path / "parts/0" / n).rglob("*") if f.is_file())

    topp = nbytes(caches["topp"], ("topp_counts", "topp_ids", "topp_logprobs", "tail_logmass"))
    topk = nbytes(caches["topk"], ("topk_ids", "topk_logprobs", "tail_logmass"))
    assert topp < 0.75 * topk, (topp, topk)


def fix_checksum(path, i: int) -> None:
    """Recompute index row i's checksum from its stored arrays (a buggy dump that wrote bad data
    with a matching checksum), so that only the semantic checks can see the damage."""
    r = CacheReader(path, check=False)
    p = r.parts[0]
    names = data_array_names(r.attrs["settings"])
    slabs = r.read_slab(0, np.array([i]), names)
    arrays = {n: slab[int(st[0]):int(st[0]) + int(p.length(AXIS_OF[n])[i])] for n, (slab, st) in slabs.items()}
    crc = sample_checksum(int(p.cols["row"][i]), r.sample_ids(p, np.array([i]))[0], checksum_arrays(arrays))
    zarr.open_array(str(path / "parts/0/index/checksum"), mode="r+")[i] = crc


@pytest.mark.parametrize("damage, match", [
    ("counts", "topp_counts sum to"),
    ("mass", r"keeps mass .* < P|sum\(exp\(topk\)\) \+ exp\(tail\)"),
])
def test_verify_catches_a_damaged_nucleus(caches, tmp_path, damage, match):
    import shutil

    path = tmp_path / "c.zarr"
    shutil.copytree(caches["topp"], path)
    if damage == "counts":
        arr = zarr.open_array(str(path / "parts/0/topp_counts"), mode="r+")
        c = arr[...]
        c[0] = c[0] + 1 if c[0] < K else c[0] - 1
        arr[...] = c
    else:  # drop the last kept id of position 0 into nothing: the nucleus no longer reaches P
        arr = zarr.open_array(str(path / "parts/0/tail_logmass"), mode="r+")
        t = arr[...]
        t[0] = -30.0
        arr[...] = t
    fix_checksum(path, 0)
    rep = verify_cache(path)
    assert not rep.ok and any(__import__("re").search(match, p) for p in rep.problems), str(rep)


def test_topp_at_p1_and_k_v_trains_like_online_kd(tmp_path, synth_data, tiny_student, tiny_teacher, caches):
    """P = 1, K = V keeps every id: the k+1 buckets are the full distribution, the reference."""
    online = _run(synth_data, tiny_student, tmp_path / "online", teacher=str(tiny_teacher))
    cached = _run(synth_data, tiny_student, tmp_path / "cached", cache=str(caches["full"]))
    _assert_same_run(cached, online)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_topp_trains_with_any_divergence(tmp_path, synth_data, tiny_student, caches, divergence):
    from kdcache.config import LossConfig
    from kdcache.train import train

    out = train(make_cfg(synth_data, tiny_student, tmp_path / "run", cache=str(caches["topp"]), max_steps=3,
                         lr=1e-3, loss=LossConfig(divergence=divergence)))
    m = read_metrics(out)
    assert len(m) == 3 and all(np.isfinite(x["loss/total"]) and x["loss/res"] > 0 and x["loss/vis"] > 0 for x in m)


def test_inspect_lists_the_kept_ids_only(caches):
    from kdcache.inspect_cache import inspect_cache

    path = caches["topp"]
    rec = CacheReader(path).read_range(0, 0, 1)[0]
    lines = inspect_cache(path, sample=rec.sample_id, top=K)
    rows = [ln for ln in lines if "| rest" in ln]
    kept = torch.isfinite(rec.topk_logprobs).sum(1).tolist()
    assert len(rows) == len(kept)
    for ln, c in zip(rows, kept):  # each listed id shows its probability: 'tok p', two spaces apart
        assert ln.split("| rest")[0].count("  ") >= c - 1 and " 0.000" not in ln.split("| rest")[0]


def test_arrow_gives_each_position_its_kept_ids(caches, tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kdcache.cache.arrow import export_parquet, to_arrow

    t = to_arrow(caches["topp"])
    assert t.schema.field("topk_ids").type == pa.list_(pa.int32())  # variable length, not fixed K
    recs = CacheReader(caches["topp"]).read_range(0, 0, 20)
    kept = torch.cat([torch.isfinite(r.topk_logprobs).sum(1) for r in recs])
    lens = pc.list_value_length(t.column("topk_ids")).to_numpy()
    assert t.num_rows == len(kept) and (lens == kept.numpy()).all()
    first = recs[0]
    c0 = int(kept[0])
    assert t.column("topk_ids")[0].as_py() == first.topk_ids[0, :c0].tolist()
    assert np.isfinite(pc.list_flatten(t.column("topk_logprobs")).to_numpy().astype(np.float32)).all()  # no padding
    n = export_parquet(caches["topp"], tmp_path / "t.parquet")
    assert n == t.num_rows and pq.read_table(tmp_path / "t.parquet").column("topk_ids").to_pylist() == \
        t.column("topk_ids").to_pylist()
