"""verify_cache passes a good cache and names the part/sample/array of each kind of damage."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from kdcache.cache import CacheCorrupt, CacheReader, CacheWriter
from kdcache.cache.format import checksum_arrays, sample_checksum
from kdcache.cache.verify import verify_cache

from .helpers import SMALL, make_attrs_for, make_record, write_cache


@pytest.fixture(scope="module")
def good(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("verify") / "good"
    w = write_cache(path, records, skips=[(77, "gone", "missing_image")], close=False)
    W = np.random.default_rng(0).normal(size=(97, 16)).astype(np.float32)
    w.write_gram(W.T @ W)
    w.close()
    return path


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(good, dst)
    return dst


def chunk_files(path, array):
    files = sorted(p for p in (path / "parts/0" / array / "c").rglob("*") if p.is_file())
    assert len(files) >= 3, files
    return files


def test_good_cache_passes(good):
    rep = verify_cache(good)
    assert rep.ok, str(rep)
    assert rep.samples_checked == 40 and rep.samples_skipped == 1 and rep.parts == 1
    assert verify_cache(good, expected_attrs=make_attrs_for()).ok


def test_flipped_byte_in_a_chunk_is_caught(copy):
    f = chunk_files(copy, "topk_logprobs")[1]
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x04
    f.write_bytes(bytes(data))
    rep = verify_cache(copy)
    assert not rep.ok
    assert all("array topk_logprobs" in p and "cannot be decoded" in p for p in rep.problems)
    assert any("part 0 sample 's000" in p for p in rep.problems)
    # the reader refuses too, naming the array instead of returning garbage
    with pytest.raises(CacheCorrupt, match="topk_logprobs"):
        CacheReader(copy).read_range(0, 0, 40)


def test_truncated_chunk_is_caught(copy):
    f = chunk_files(copy, "topk_ids")[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rep = verify_cache(copy)
    assert not rep.ok and rep.problems
    assert all("array topk_ids" in p for p in rep.problems), rep.problems
    assert "part 0 sample 's00000' (row 0)" in rep.problems[0]


def stored_checksum(rec) -> int:
    h = rec.visual_hidden.view(torch.int16).numpy().view(np.uint16)
    return sample_checksum(rec.row, rec.sample_id, checksum_arrays({
        "input_ids": rec.input_ids.numpy(), "roles": rec.roles.numpy(), "positions": rec.positions.numpy(),
        "kinds": rec.kinds.numpy(), "topk_ids": rec.topk_ids.numpy(), "topk_logprobs": rec.topk_logprobs.numpy(),
        "tail_logmass": rec.tail_logmass.numpy(), "visual_hidden": h}))


def test_out_of_range_id_is_caught(copy):
    """Write an id >= vocab straight into the store with a matching checksum (as a buggy dump
    would), so only the range check can see it."""
    r = CacheReader(copy, check=False)
    p = r.parts[0]
    i = 5  # index row of sample s00005
    off = int(p.cols["pos_offset"][i])
    ids = zarr.open_array(str(copy / "parts/0/topk_ids"), mode="r+")
    ids[off + 1, 3] = 97 + 4
    r.refresh()
    rec = r.read_range(0, 5, 6)[0]
    assert int(rec.topk_ids[1, 3]) == 101
    crc = zarr.open_array(str(copy / "parts/0/index/checksum"), mode="r+")
    crc[i] = stored_checksum(rec)
    rep = verify_cache(copy)
    assert len(rep.problems) == 1, rep.problems
    assert rep.problems[0].startswith("part 0 sample 's00005' (row 5): array topk_ids has ids "
                                      "outside [0, 97)")
    assert rep.problems[0].endswith("max 101")
    # a smaller vocabulary given by the caller flags ids at or above it in every sample
    small = verify_cache(copy, vocab_size=10)
    assert len(small.problems) >= 40


def test_data_changed_without_checksum_is_caught(copy):
    tail = zarr.open_array(str(copy / "parts/0/tail_logmass"), mode="r+")
    tail[3] = tail[3] + 0.5
    rep = verify_cache(copy)
    assert any("checksum mismatch" in p and "(row 0)" in p for p in rep.problems), rep.problems
    assert any("sum(exp(topk)) + exp(tail)" in p for p in rep.problems), rep.problems


def test_fingerprint_mismatch_is_reported(good):
    rep = verify_cache(good, expected_attrs=make_attrs_for(k=16))
    assert not rep.ok
    assert rep.problems == ["fingerprint mismatch: settings.top_k: cache has 8, this run asks 16"]


def test_inconsistent_records_are_caught(tmp_path):
    """A record whose log-probs are not sorted / do not sum to 1 with the tail is flagged."""
    path = tmp_path / "c"
    recs = [make_record(i) for i in range(3)]
    recs[1].topk_logprobs = recs[1].topk_logprobs.flip(-1)  # ascending: wrong order
    recs[2].tail_logmass = recs[2].tail_logmass - 3.0  # the k + 1 buckets no longer sum to 1
    w = CacheWriter(path, make_attrs_for(), layout=SMALL)
    for r in recs:
        w.add(r)
    w.write_gram(np.eye(16, dtype=np.float32))
    w.close()
    rep = verify_cache(path)
    assert len(rep.problems) == 2, rep.problems
    assert "'s00001' (row 1): array topk_logprobs is not sorted descending" in rep.problems[0]
    assert "'s00002' (row 2): sum(exp(topk)) + exp(tail)" in rep.problems[1]


def test_missing_cache_and_bad_attributes(tmp_path, good):
    assert "no cache" in verify_cache(tmp_path / "nothing").problems[0]
    dst = tmp_path / "bad"
    shutil.copytree(good, dst)
    g = zarr.open_group(str(dst), mode="r+")
    attrs = dict(g.attrs)
    attrs["settings"] = {**attrs["settings"], "top_k": "eight"}
    g.attrs.put(attrs)
    rep = verify_cache(dst)
    assert len(rep.problems) == 1 and "settings.top_k" in rep.problems[0]


def test_cli_ends_a_failed_verify_with_one_error_line(copy):
    """Issue 15: the report lists every problem; the last line says how many, the first, and the fix."""
    from typer.testing import CliRunner

    from kdcache.cli import app

    f = chunk_files(copy, "topk_ids")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["verify", str(copy)])
    assert r.exit_code == 1
    first = verify_cache(copy).problems[0]
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: cache {copy} failed verification: ") and f"the first: {first}. Fix: " in last, last
    assert "part 0 sample 's000" in last
