"""Attributes, schema, compatibility checks, layout and checksums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from .helpers import make_attrs_for

from kdcache.cache import CacheFormatError, CacheMismatch, Layout, check_compatible, load_schema
from kdcache.cache.format import (
    FORMAT_VERSION,
    bf16_bits_to_float32,
    codec_table,
    data_specs,
    sample_checksum,
    validate_attrs,
)

REPO = Path(__file__).resolve().parents[2]


def test_schema_shipped_copy_matches_repo_schema():
    repo = json.loads((REPO / "schemas" / "cache_attrs.schema.json").read_text())
    assert load_schema() == repo


def test_make_attrs_valid_and_canonical():
    a = make_attrs_for(positions=("response", "visual"))
    assert a["kdcache_format"] == FORMAT_VERSION
    assert a["settings"]["positions"] == ["visual", "response"]
    # JSON round trip keeps it valid: it is what zarr stores
    validate_attrs(json.loads(json.dumps(a)))
    # every data array has a codec entry; bf16 hidden is a uint16 with a logical dtype
    assert a["codecs"]["visual_hidden"]["dtype"] == "uint16"
    assert a["codecs"]["visual_hidden"]["logical_dtype"] == "bfloat16"
    # float16 log-probs are stored as their uint16 bits, delta-coded (lossless)
    assert a["codecs"]["topk_logprobs"]["dtype"] == "uint16"
    assert a["codecs"]["topk_logprobs"]["logical_dtype"] == "float16"
    assert a["codecs"]["topk_logprobs"]["compressor"] == "delta-zstd-3"
    assert "index/checksum" in a["codecs"]
    assert "visual_hidden" not in make_attrs_for(hidden="none")["codecs"]


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("logprob_dtype", "bf16", "settings.logprob_dtype"),
        ("relation", "lowrank:0", "settings.relation"),
        ("top_k", 0, "settings.top_k"),
        ("typo_key", 1, "typo_key"),
    ],
)
def test_schema_rejects_bad_settings(key, value, needle):
    a = make_attrs_for()
    a["settings"][key] = value
    with pytest.raises(CacheFormatError, match=needle):
        validate_attrs(a)


def test_schema_requires_dataset_hash_and_known_format():
    a = make_attrs_for()
    del a["dataset"]["sha256"]
    with pytest.raises(CacheFormatError, match="dataset"):
        validate_attrs(a)
    a["dataset"]["content_hash"] = "xyz"
    validate_attrs(a)
    a["kdcache_format"] = FORMAT_VERSION + 1
    with pytest.raises(CacheFormatError, match="not supported"):
        validate_attrs(a)


def test_check_compatible_names_the_key_and_ignores_version():
    a = make_attrs_for(k=64)
    b = json.loads(json.dumps(a))
    b["kdcache_version"] = "9.9.9"
    b["codecs"] = {}
    check_compatible(a, b)
    b["settings"]["top_k"] = 32
    b["teacher"]["vocab_size"] = 5
    with pytest.raises(CacheMismatch) as e:
        check_compatible(a, b)
    msg = str(e.value)
    assert "settings.top_k: cache has 64, this run asks 32" in msg
    assert "teacher.vocab_size: cache has 97, this run asks 5" in msg


def test_check_compatible_compares_content_not_paths():
    """Issue 15: the paths of the data, teacher and tokenizer are where they were found; the
    hashes next to them decide."""
    a = make_attrs_for(k=64)
    b = json.loads(json.dumps(a))
    b["dataset"]["path"] = "./" + a["dataset"]["path"]
    b["teacher"]["name_or_path"] = b["tokenizer"]["name_or_path"] = "/mnt/train-box/models/teacher"
    check_compatible(a, b)
    b["dataset"]["sha256"] = "1" * 64
    b["tokenizer"]["vocab_hash"] = "other"
    with pytest.raises(CacheMismatch) as e:
        check_compatible(a, b)
    assert "dataset.sha256: cache has" in str(e.value) and "tokenizer.vocab_hash" in str(e.value)
    assert "dataset.path" not in str(e.value) and "name_or_path" not in str(e.value)


def test_layout_rows_are_whole_chunks_per_shard():
    lay = Layout(chunk_bytes=1 << 20, shard_bytes=24 << 20)
    chunk, shard = lay.rows(64 * 2)  # fp16 [k=64] rows
    assert chunk == 8192 and shard % chunk == 0 and shard == 24 * 8192
    # a row bigger than a chunk still gets one row per chunk
    assert lay.rows(4 << 20) == (1, 6)
    specs = data_specs(make_attrs_for()["settings"], 16, lay)
    assert specs["topk_ids"].row_shape == (8,) and specs["visual_hidden"].row_shape == (16,)
    assert set(codec_table(make_attrs_for()["settings"], 16, lay)) >= set(specs)


def test_checksum_sees_one_flipped_bit():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 100, 10).astype(np.int32), rng.random((4, 3)).astype(np.float16)]
    c = sample_checksum(7, "s7", arrays)
    arrays[1].view(np.uint16)[2, 1] ^= 1
    assert sample_checksum(7, "s7", arrays) != c


def test_checksum_covers_row_and_sample_id():
    """Issue 8: the crc starts with the row (little-endian int64) and the id's utf-8 bytes."""
    import zlib

    arrays = [np.arange(5, dtype=np.int32)]
    c = sample_checksum(3, "é1", arrays)
    assert c == zlib.crc32(arrays[0].tobytes(), zlib.crc32("é1".encode(), zlib.crc32(np.int64(3).tobytes())))
    assert c == sample_checksum(3, "é1".encode(), arrays)  # stored bytes give the same
    assert len({c, sample_checksum(4, "é1", arrays), sample_checksum(3, "é2", arrays)}) == 3


def test_checksum_of_a_text_only_sample_skips_its_empty_arrays():
    """Issue 15: a text-only sample has [0, D] visual rows (and a [0] image span); they add no
    bytes, so the crc equals that of the sample without them, and a bit flip is still seen."""
    import zlib

    ids = np.arange(6, dtype=np.int32)
    hidden = np.zeros((0, 16), dtype=np.uint16)  # visual_hidden of a text-only sample
    c = sample_checksum(2, "t", [ids, hidden, np.zeros(0, np.float32)])
    assert c == sample_checksum(2, "t", [ids]) == zlib.crc32(ids.tobytes(), zlib.crc32(b"t", zlib.crc32(
        np.int64(2).tobytes())))
    ids[0] ^= 1
    assert sample_checksum(2, "t", [ids, hidden]) != c


def test_bf16_bits_round_trip_exact():
    x = torch.randn(100).to(torch.bfloat16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_bits_to_float32(bits), x.float().numpy())
