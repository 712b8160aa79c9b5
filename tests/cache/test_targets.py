"""The cache's two extra target modes (issue 10) and the row/id checksum (issue 8).

``targets: hidden`` (exact): top-k plus position_hidden [P, D] and the LM head once;
``targets: sampled:N``: distinct drawn ids, their log-probs, counts [P, N] and the tail.
Records are consistent by construction: random hidden states H and LM head W, targets from
``kdcache.teacher`` (``topk_from_hidden`` / ``sample_from_hidden``) on H W^T, so verify's checks,
the top-1 probe included, hold for real; damage is then written straight into the zarr store.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from kdcache.cache import (
    CacheCorrupt,
    CacheFormatError,
    CacheReader,
    CacheWriter,
    make_attrs,
)
from kdcache.cache.arrow import export_parquet, to_arrow
from kdcache.cache.format import checksum_arrays, sample_checksum
from kdcache.cache.verify import verify_cache
from kdcache.config import ConfigError, DumpConfig, validate
from kdcache.positions import ROLE_VISUAL, select_positions
from kdcache.records import TeacherRecord
from kdcache.teacher import sample_from_hidden, sample_uniforms, topk_from_hidden

from .helpers import HIDDEN, SMALL, VOCAB, K, make_attrs_for, make_roles, records_equal

N_DRAWS = 8
W_HEAD = torch.from_numpy(np.random.default_rng(123).normal(0, 0.6, size=(VOCAB, HIDDEN))).float()  # [V, D]


def targets_attrs(targets: str, *, positions=("visual", "response"), hidden="bf16", **kw):
    attrs = make_attrs_for(positions=positions, hidden=hidden, **kw)
    s = dict(attrs["settings"], targets=targets)
    if targets.startswith("sampled:"):
        s.update(top_k=int(targets.split(":")[1]), draw_seed=5)
    return make_attrs(attrs["teacher"], attrs["tokenizer"], attrs["dataset"], s, layout=SMALL)


def target_record(row: int, targets: str, *, positions=("visual", "response"), n_vis=6) -> TeacherRecord:
    """A record of the given mode from random H (bf16-exact, so storage is lossless) and W_HEAD."""
    rng = np.random.default_rng([7, row])
    roles = make_roles(rng, n_vis)
    T = roles.shape[0]
    pos, kinds = select_positions(roles, tuple(positions))
    H = torch.from_numpy(rng.normal(size=(T, HIDDEN))).to(torch.bfloat16)  # [T, D]
    h = H[torch.from_numpy(pos).long()].float()  # [P, D]
    counts = position_hidden = None
    if targets.startswith("sampled:"):
        n = int(targets.split(":")[1])
        ids, lp, tail, counts = sample_from_hidden(h, W_HEAD, n, uniforms=sample_uniforms(5, row, len(pos), n))
        counts = counts.to(torch.int32)
    else:
        ids, lp, tail = topk_from_hidden(h, W_HEAD, K)
        if targets == "hidden":
            position_hidden = h.to(torch.bfloat16)
    return TeacherRecord(
        sample_id=f"s{row:05d}", row=row,
        input_ids=torch.from_numpy(rng.integers(0, VOCAB, size=T).astype(np.int32)),
        roles=torch.from_numpy(roles), positions=torch.from_numpy(pos), kinds=torch.from_numpy(kinds),
        topk_ids=ids.to(torch.int32), topk_logprobs=lp.to(torch.float16), tail_logmass=tail,
        visual_hidden=H[torch.from_numpy(np.nonzero(roles == ROLE_VISUAL)[0]).long()],
        sample_counts=counts, position_hidden=position_hidden)


def write(path, targets, recs, *, positions=("visual", "response")):
    w = CacheWriter(path, targets_attrs(targets, positions=positions), layout=SMALL)
    for r in recs:
        w.add(r)
    w.write_gram((W_HEAD.T @ W_HEAD).numpy())
    if targets == "hidden":
        w.write_lm_head(W_HEAD.numpy())
    w.close()


def fix_checksum(path, i: int) -> None:
    """Recompute index row i's checksum from what is on disk (a buggy dump that wrote bad data
    with a matching checksum), so that only the semantic checks can see the damage."""
    r = CacheReader(path, check=False)
    rec = r.read_range(0, i, i + 1)[0]
    bits = (lambda t: None if t is None else
            (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()))
    vis = bits(rec.visual_hidden) if (path / "parts/0/visual_hidden").exists() else None
    counts = None if rec.sample_counts is None else rec.sample_counts.numpy().astype(np.uint16)
    crc = sample_checksum(rec.row, rec.sample_id, checksum_arrays({
        "input_ids": rec.input_ids.numpy(), "roles": rec.roles.numpy(), "positions": rec.positions.numpy(),
        "kinds": rec.kinds.numpy(), "topk_ids": rec.topk_ids.numpy(), "topk_logprobs": rec.topk_logprobs.numpy(),
        "tail_logmass": rec.tail_logmass.numpy(), "visual_hidden": vis, "sample_counts": counts,
        "position_hidden": bits(rec.position_hidden)}))
    zarr.open_array(str(path / "parts/0/index/checksum"), mode="r+")[i] = crc


SAMPLED = f"sampled:{N_DRAWS}"


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """targets -> (24 records, cache path), written once per module."""
    out = {}
    for targets in ("hidden", SAMPLED):
        recs = [target_record(i, targets) for i in range(24)]
        path = tmp_path_factory.mktemp("targets") / "c"
        write(path, targets, recs)
        out[targets] = (recs, path)
    return out


@pytest.fixture(params=["hidden", SAMPLED])
def mode_cache(request, caches):
    return (request.param, *caches[request.param])


def copy_of(caches, targets, tmp_path):
    recs, path = caches[targets]
    shutil.copytree(path, tmp_path / "c")
    return recs, tmp_path / "c"


def test_round_trip_and_verify(mode_cache):
    targets, recs, path = mode_cache
    rep = verify_cache(path)
    assert rep.ok and rep.samples_checked == 24, str(rep)
    reader = CacheReader(path)
    got = reader.read_range(0, 0, 24)
    for a, b in zip(recs, got):
        records_equal(a, b)  # visual_hidden too: stored, or rebuilt from position_hidden
        if targets == "hidden":
            assert b.sample_counts is None and b.position_hidden.dtype == torch.bfloat16
            assert torch.equal(a.position_hidden.view(torch.int16), b.position_hidden.view(torch.int16))
        else:
            assert b.position_hidden is None and b.sample_counts.dtype == torch.int32
            assert torch.equal(a.sample_counts, b.sample_counts)
            assert (b.sample_counts.sum(1) == N_DRAWS).all()
    part = path / "parts/0"
    # hidden with visual + response positions: the image rows are stored once, in position_hidden
    assert (part / "visual_hidden").exists() == (targets != "hidden")
    assert (part / "position_hidden").exists() == (targets == "hidden")
    assert (part / "sample_counts").exists() == (targets != "hidden")
    if targets == "hidden":
        w = reader.lm_head()
        assert w.dtype == torch.bfloat16 and torch.equal(w, W_HEAD.to(torch.bfloat16))
        ph = zarr.open_array(str(part / "position_hidden"), mode="r")
        assert ph.attrs["logical_dtype"] == "bfloat16" and ph.dtype == np.uint16
    else:
        with pytest.raises(FileNotFoundError, match="teacher_lm_head"):
            reader.lm_head()
        assert zarr.open_array(str(part / "sample_counts"), mode="r").dtype == np.uint16


def test_arrow_and_parquet(mode_cache, tmp_path):
    targets, recs, path = mode_cache
    t = to_arrow(path)
    P = sum(len(r.positions) for r in recs)
    assert t.num_rows == P
    assert "position_hidden" not in t.column_names and "visual_hidden" not in t.column_names
    if targets == "hidden":
        assert "sample_counts" not in t.column_names
    else:
        counts = np.array(t.column("sample_counts").to_pylist())  # [P, N]
        np.testing.assert_array_equal(counts, np.concatenate([r.sample_counts.numpy() for r in recs]))
        lp = np.array(t.column("topk_logprobs").to_pylist(), dtype=np.float64)
        assert np.isneginf(lp[counts == 0]).all() and np.isfinite(lp[counts > 0]).all()
    out = tmp_path / "x.parquet"
    assert export_parquet(path, out) == P
    assert pq.read_table(out).equals(t)


def test_hidden_visual_only_stores_visual_rows(tmp_path):
    """positions visual without response: the last image output (a response position when a caption
    follows at once) would be missing from position_hidden, so visual_hidden is stored."""
    recs = [target_record(i, "hidden", positions=("visual",)) for i in range(5)]
    write(tmp_path / "c", "hidden", recs, positions=("visual",))
    assert (tmp_path / "c/parts/0/visual_hidden").exists()
    for a, b in zip(recs, CacheReader(tmp_path / "c").read_range(0, 0, 5)):
        records_equal(a, b)
    assert verify_cache(tmp_path / "c").ok


def test_sampled_counts_not_summing_to_n_are_caught(caches, tmp_path):
    _recs, path = copy_of(caches, SAMPLED, tmp_path)
    p = CacheReader(path).parts[0]
    off = int(p.cols["pos_offset"][3])
    counts = zarr.open_array(str(path / "parts/0/sample_counts"), mode="r+")
    counts[off + 1, 0] = counts[off + 1, 0] + 1  # N + 1 draws at that position
    fix_checksum(path, 3)
    rep = verify_cache(path)
    assert len(rep.problems) == 1, rep.problems
    assert rep.problems[0].startswith("part 0 sample 's00003' (row 3): array sample_counts sums to 9 at position")
    assert "expected N = 8 draws" in rep.problems[0]


def test_exact_cache_with_nan_hidden_row_is_caught(caches, tmp_path):
    recs, path = copy_of(caches, "hidden", tmp_path)
    p = CacheReader(path).parts[0]
    off = int(p.cols["pos_offset"][2])
    ph = zarr.open_array(str(path / "parts/0/position_hidden"), mode="r+")
    row = ph[off + 4]
    row[5] = 0x7FC0  # bf16 NaN
    ph[off + 4] = row
    fix_checksum(path, 2)
    rep = verify_cache(path)
    assert len(rep.problems) == 1, rep.problems
    want = (f"part 0 sample 's00002' (row 2): array position_hidden has non-finite values at position "
            f"{int(recs[2].positions[4])} (1 row(s))")
    assert rep.problems[0] == want


def test_exact_cache_whose_lm_head_does_not_give_the_top1_is_caught(caches, tmp_path):
    _recs, path = copy_of(caches, "hidden", tmp_path)
    other = torch.from_numpy(np.random.default_rng(9).normal(0, 0.6, size=(VOCAB, HIDDEN))).float()
    zarr.open_array(str(path / "teacher_lm_head"), mode="r+")[...] = \
        other.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    rep = verify_cache(path)
    assert rep.problems and all("is not the argmax" in p and "teacher_lm_head" in p for p in rep.problems)
    # a missing head is named
    shutil.rmtree(path / "teacher_lm_head")
    rep = verify_cache(path)
    missing = ("teacher_lm_head missing although settings.targets is 'hidden' (rank 0 writes it with "
               "writer.write_lm_head)")
    assert rep.problems == [missing]


@pytest.mark.parametrize("targets", ["hidden", SAMPLED])
@pytest.mark.parametrize("what", ["row", "sample_id"])
def test_changed_row_or_sample_id_fails_the_checksum(caches, tmp_path, targets, what):
    """Issue 8: the crc covers the sample's row and id, so moving or renaming a sample is caught."""
    _recs, path = copy_of(caches, targets, tmp_path)
    i = 4
    if what == "row":
        rows = zarr.open_array(str(path / "parts/0/index/row"), mode="r+")
        rows[i] = 500  # unused row, inside the dataset: only the checksum can tell
    else:
        p = CacheReader(path).parts[0]
        b = zarr.open_array(str(path / "parts/0/sample_id_bytes"), mode="r+")
        o = int(p.cols["id_offset"][i]) + int(p.cols["id_len"][i]) - 1
        b[o] = ord("9")  # 's00004' -> 's00009': still a valid id
    rep = verify_cache(path)
    assert len(rep.problems) == 1, rep.problems
    assert "checksum mismatch" in rep.problems[0]
    assert ("(row 500)" if what == "row" else "'s00009'") in rep.problems[0]
    with pytest.raises(CacheCorrupt, match="checksum mismatch"):
        CacheReader(path).read_range(0, 0, 24)


def test_writer_refuses_inconsistent_mode_records(tmp_path):
    rec = target_record(0, SAMPLED)
    bad = TeacherRecord(**{**rec.__dict__, "sample_counts": rec.sample_counts * 2})
    w = CacheWriter(tmp_path / "s", targets_attrs(SAMPLED), layout=SMALL)
    with pytest.raises(ValueError, match="sum to N=8"):
        w.add(bad)
    with pytest.raises(ValueError, match="sample_counts is None"):
        w.add(TeacherRecord(**{**rec.__dict__, "sample_counts": None}))
    w.abandon()
    h = target_record(0, "hidden")
    w = CacheWriter(tmp_path / "h", targets_attrs("hidden"), layout=SMALL)
    with pytest.raises(ValueError, match="position_hidden is None"):
        w.add(TeacherRecord(**{**h.__dict__, "position_hidden": None}))
    with pytest.raises(ValueError, match=r"teacher_lm_head must be \[vocab_size, hidden_size\]"):
        w.write_lm_head(np.zeros((3, HIDDEN), np.float32))
    w.abandon()


@pytest.mark.parametrize("settings,needle", [
    ({"targets": "sampled:0"}, "targets"),
    ({"targets": "sampled:8", "top_k": 4, "draw_seed": 0}, "top_k must equal N"),
    ({"targets": "sampled:8"}, "draw_seed is missing"),
    ({"targets": "hidden", "hidden": "none"}, "needs hidden states"),
    ({"targets": "topk", "draw_seed": 1}, "draw_seed is only for"),
    ({"targets": "beam:4"}, "targets"),
])
def test_attributes_refuse_bad_targets(settings, needle):
    base = make_attrs_for()
    s = {**base["settings"], **settings}
    with pytest.raises(CacheFormatError, match=needle):
        make_attrs(base["teacher"], base["tokenizer"], base["dataset"], s, layout=SMALL)


@pytest.mark.parametrize("targets,hidden,needle", [
    ("sampled:0", "bf16", r"targets: 'sampled:0' draws 0 ids per position \(accepted: topk, hidden, sampled:N"),
    ("sampled:65536", "bf16", "draws 65536 ids"),
    ("top5", "bf16", "is not a target mode"),
    ("hidden", "none", "hidden is 'none'"),
])
def test_config_validates_targets(targets, hidden, needle):
    cfg = DumpConfig(teacher="t", data="d", images="i", out="o", targets=targets, hidden=hidden)
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)
    validate(DumpConfig(teacher="t", data="d", images="i", out="o", targets="sampled:65535"))


def test_stats_and_inspect_name_the_mode(mode_cache):
    from kdcache.cache.stats import cache_stats
    from kdcache.inspect_cache import summary_lines

    targets, _recs, path = mode_cache
    st = cache_stats(path)
    assert st["targets"] == targets and np.isfinite(st["mean_entropy_k1"])  # -inf padding adds 0, not NaN
    if targets == "hidden":
        assert st["bytes"]["teacher_lm_head"] > 0 and st["bytes"]["position_hidden"] > 0
    want = "targets    hidden" if targets == "hidden" else f"targets    {SAMPLED} (draw seed 5)"
    assert want in summary_lines(st)
