"""Torch dataset (pre-filtering of bad samples) and batch collation."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, SiglipImageProcessor

from kdcache.data.collate import ROLE_PAD, LlavaTorchDataset, collate, prepare
from kdcache.data.llava import LlavaSample, SampleError, read_llava_json
from kdcache.data.synthetic import make_synthetic
from kdcache.data.templates import image_placeholder_id, tokenize_sample
from kdcache.positions import ROLE_VISUAL

N_IMG = 5
PIX = 16


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("syn"), num_images=6, qa_per_image=2, num_val=2, num_eval=2, seed=0, num_text_only=2
    )


@pytest.fixture(scope="module")
def tok(syn):
    return AutoTokenizer.from_pretrained(syn["tokenizer"])


@pytest.fixture(scope="module")
def proc():
    return SiglipImageProcessor(size={"height": PIX, "width": PIX})


def dataset(samples, syn, tok, proc, **kw):
    args = dict(template="chat", image_token_id=image_placeholder_id(tok), num_image_tokens=N_IMG, max_length=256)
    args.update(kw)
    return LlavaTorchDataset(samples, tok, proc, syn["images_root"], **args)


def test_items(syn, tok, proc):
    samples = read_llava_json(syn["instruct"])
    ds = dataset(samples, syn, tok, proc)
    assert len(ds) == len(samples) == 8 and ds.skipped.total == 0
    for i, s in enumerate(samples):
        it = ds[i]
        ref = tokenize_sample(s, tok, template="chat", image_token_id=image_placeholder_id(tok), num_image_tokens=N_IMG, max_length=256)
        assert it["sample_id"] == s.id and it["row"] == s.row
        assert it["input_ids"].dtype == torch.int64 and it["labels"].dtype == torch.int64 and it["roles"].dtype == torch.uint8
        assert np.array_equal(it["input_ids"].numpy(), ref.input_ids) and np.array_equal(it["roles"].numpy(), ref.roles)
        if s.image:
            pv = it["pixel_values"]
            assert pv.shape == (3, PIX, PIX) and pv.dtype == torch.float32
            expect = proc(images=Image.open(syn["images_root"] / s.image).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            assert torch.equal(pv, expect)
        else:
            assert it["pixel_values"] is None


def test_collate_padding(syn, tok, proc):
    ds = dataset(read_llava_json(syn["instruct"]), syn, tok, proc)
    items = [ds[i] for i in range(len(ds))]
    assert any(it["pixel_values"] is None for it in items) and any(it["pixel_values"] is not None for it in items)
    pad = tok.pad_token_id
    b = collate(items, pad_token_id=pad)
    B, T = len(items), max(len(it["input_ids"]) for it in items)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == b["roles"].shape == (B, T)
    assert b["roles"].dtype == torch.uint8 and b["input_ids"].dtype == torch.int64
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        assert torch.equal(b["input_ids"][i, :n], it["input_ids"]) and (b["input_ids"][i, n:] == pad).all()
        assert (b["attention_mask"][i, :n] == 1).all() and (b["attention_mask"][i, n:] == 0).all()
        assert torch.equal(b["labels"][i, :n], it["labels"]) and (b["labels"][i, n:] == -100).all()
        assert torch.equal(b["roles"][i, :n], it["roles"]) and (b["roles"][i, n:] == ROLE_PAD).all()
    with_img = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    assert b["pixel_values"].shape == (len(with_img), 3, PIX, PIX)
    assert all(torch.equal(b["pixel_values"][j], p) for j, p in enumerate(with_img))  # batch order
    assert b["has_image"].tolist() == [it["pixel_values"] is not None for it in items]
    # visual tokens across the batch = n_images * num_image_tokens (what Llava checks)
    assert int((b["roles"] == ROLE_VISUAL).sum()) == len(with_img) * N_IMG
    assert b["sample_ids"] == [it["sample_id"] for it in items] and b["rows"] == [it["row"] for it in items]


def test_collate_text_only_batch_and_dataloader(syn, tok, proc):
    ds = dataset(read_llava_json(syn["instruct"]), syn, tok, proc)
    text_idx = [i for i in range(len(ds)) if ds.samples[i].image is None]
    b = collate([ds[i] for i in text_idx], pad_token_id=0)
    assert b["pixel_values"] is None and not b["has_image"].any()
    dl = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=functools.partial(collate, pad_token_id=tok.pad_token_id))
    batches = list(dl)
    assert [len(x["sample_ids"]) for x in batches] == [3, 3, 2]
    assert [i for x in batches for i in x["sample_ids"]] == [s.id for s in ds.samples]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=0)


def _bad_samples(syn, tmp_path):
    good = [s for s in read_llava_json(syn["instruct"]) if s.image][:2]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    long_q = " ".join(["circle"] * 300)

    def mk(sid, image, turns):
        return LlavaSample(id=sid, row=100 + len(sid), image=image, turns=turns, source="bad.json")

    qa = [("user", "<image>\nWhat colour?"), ("assistant", "red")]
    return good + [
        mk("missing", "nope.png", qa),
        mk("corrupt", str(corrupt), qa),
        mk("no-token", good[0].image, [("user", "What colour?"), ("assistant", "red")]),
        mk("twice", good[0].image, [("user", "<image><image>\nQ"), ("assistant", "red")]),
        mk("no-answer", good[0].image, [("user", "<image>\nQ")]),
        mk("empty", good[0].image, [("user", "<image>\nQ"), ("assistant", "")]),
        mk("long", good[0].image, [("user", "<image>\n" + long_q), ("assistant", "red")]),
        mk("long2", good[0].image, [("user", "<image>\n" + long_q), ("assistant", "red")]),
    ]


def test_bad_samples_are_skipped_and_counted(syn, tok, proc, tmp_path, capsys):
    samples = _bad_samples(syn, tmp_path)
    ds = dataset(samples, syn, tok, proc)
    assert [s.id for s in ds.samples] == [s.id for s in samples[:2]]
    assert ds.skipped.summary() == (
        "skipped 8 samples: 1 missing_image, 1 corrupt_image, 1 no_image_token, 1 repeated_image_token, "
        "1 no_response, 1 empty_response, 2 too_long"
    )
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ds.skipped.summary() and "'missing'" in err
    assert len(ds) == 2 and ds[1]["sample_id"] == samples[1].id


@pytest.mark.parametrize("sid", ["missing", "corrupt", "no-token", "twice", "no-answer", "empty", "long"])
def test_bad_samples_raise_by_flag(syn, tok, proc, tmp_path, sid):
    bad = next(s for s in _bad_samples(syn, tmp_path) if s.id == sid)
    with pytest.raises(SampleError) as e:
        dataset([bad], syn, tok, proc, on_error="raise")
    assert e.value.sample_id == sid and f"'{sid}'" in str(e.value)


def test_truncated_image_needs_decode_check(syn, tok, proc, tmp_path):
    good = next(s for s in read_llava_json(syn["instruct"]) if s.image)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    s = LlavaSample("cut", 0, str(cut), good.turns, source="x.json")
    # full decode in prepare catches it before any DataLoader
    kept, _, skipped = prepare(
        [s], tok, template="chat", image_token_id=image_placeholder_id(tok), num_image_tokens=N_IMG,
        max_length=256, images_root=syn["images_root"], check_images="decode",
    )  # fmt: skip
    assert kept == [] and skipped.counts["corrupt_image"] == 1
    # with header checks only it surfaces at load time, naming the sample
    ds = dataset([s], syn, tok, proc, check_images="none")
    with pytest.raises(SampleError, match="'cut'"):
        ds[0]


def test_truncate_flag_keeps_long_samples(syn, tok, proc, tmp_path):
    samples = _bad_samples(syn, tmp_path)
    longs = [s for s in samples if s.id.startswith("long")]
    ds = dataset(longs, syn, tok, proc, on_too_long="truncate", max_length=64)
    assert len(ds) == 0 and ds.skipped.counts["too_long"] == 2  # truncation would leave no response
    ok = [s for s in samples[:2]]
    n = dataset(ok, syn, tok, proc)[0]["input_ids"].shape[0]
    ds = dataset(ok, syn, tok, proc, on_too_long="truncate", max_length=n - 1)
    assert ds[0]["input_ids"].shape[0] == n - 1


def test_length_batches_cover_each_index_once_and_cut_padding():
    import random

    from kdcache.data.collate import length_batches, padding_fraction

    rng = random.Random(0)
    lengths = [rng.randint(750, 2048) for _ in range(1000)]
    plain = [list(range(i, min(i + 8, 1000))) for i in range(0, 1000, 8)]
    windows = [i // 128 for i in range(1000)]
    bucketed = length_batches(lengths, 8, windows)
    assert sorted(i for b in bucketed for i in b) == list(range(1000))
    assert all(len(b) <= 8 for b in bucketed)
    # a sample stays in its window of 128 consecutive samples
    for b in bucketed:
        assert len({i // 128 for i in b}) == 1
    assert padding_fraction(lengths, bucketed) < 0.1 * padding_fraction(lengths, plain)
    assert length_batches(lengths, 8, windows) == bucketed  # a pure function of lengths and windows
    with pytest.raises(ValueError, match="non-decreasing"):
        length_batches(lengths, 8, windows[::-1])


def _mixed(syn, tmp_path, copies=4):
    """Good and bad samples, interleaved, with distinct rows."""
    base = _bad_samples(syn, tmp_path) + [s for s in read_llava_json(syn["instruct"])]
    out = []
    for c in range(copies):
        for j, s in enumerate(base):
            out.append(LlavaSample(f"{s.id}-{c}", len(out), s.image, s.turns, s.extra, s.source))
    return out


def test_parallel_prepare_equals_serial(syn, tok, monkeypatch, tmp_path):
    import sys

    C = sys.modules["kdcache.data.collate"]  # the module (kdcache.data.collate is also the function's name)
    monkeypatch.setattr(C, "PARALLEL_MIN_SAMPLES", 0)
    monkeypatch.setattr(C, "_POOL_CHUNK", 5)  # several chunks per worker, cut across good and bad rows
    samples = _mixed(syn, tmp_path)
    kw = dict(template="chat", image_token_id=image_placeholder_id(tok), num_image_tokens=N_IMG, max_length=256,
              images_root=syn["images_root"])
    kept1, toks1, sk1 = prepare(samples, tok, **kw)
    kept2, toks2, sk2 = prepare(samples, tok, **kw, num_proc=3)
    assert [s.id for s in kept2] == [s.id for s in kept1] and len(kept1) == 4 * 10
    for a, b in zip(toks1, toks2):
        assert a.sample_id == b.sample_id and a.row == b.row
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.roles, b.roles)
        assert np.array_equal(a.labels, b.labels)
    assert sk2.items == sk1.items and sk2.counts == sk1.counts and sk1.total == 4 * 8
    assert sk2.summary() == sk1.summary()
    kept3, toks3, sk3 = prepare(samples, tok, **kw, num_proc=3, keep_tokens=False)
    assert [s.id for s in kept3] == [s.id for s in kept1] and toks3 == [] and sk3.items == sk1.items
    # on_error="raise": the first bad sample in sample order, the same error as one process gives
    with pytest.raises(SampleError) as e1:
        prepare(samples, tok, **kw, on_error="raise")
    with pytest.raises(SampleError) as e2:
        prepare(samples, tok, **kw, on_error="raise", num_proc=3)
    assert (e2.value.sample_id, e2.value.reason, str(e2.value)) == (e1.value.sample_id, e1.value.reason, str(e1.value))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_window_dataset_equals_tokenising_first_then_bucketing(syn, tok, proc, tmp_path, num_workers):
    from kdcache.data.collate import WindowDataset, length_batches, prepare_samples

    samples = _mixed(syn, tmp_path, copies=3)
    kw = dict(template="chat", image_token_id=image_placeholder_id(tok), num_image_tokens=N_IMG, max_length=256)
    W = 12
    windows = [samples[a:a + W] for a in range(0, len(samples), W)]
    ds = WindowDataset(windows, tok, proc, syn["images_root"], batch_size=4, on_too_long="skip", **kw)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    got = list(dl)
    # the reference: everything tokenised first, batches bucketed by window (the dump's old path)
    kept, toks, skipped = prepare_samples(samples, tok, images_root=syn["images_root"], on_too_long="skip", **kw)
    ref_ds = LlavaTorchDataset.from_prepared(kept, toks, proc, syn["images_root"])
    lengths = [t.num_tokens for t in toks]
    ref = length_batches(lengths, 4, [s.row // W for s in kept])
    batches = [b for win in got for b in win["batches"]]
    assert len(got) == len(windows) and len(batches) == len(ref)
    for b, idx in zip(batches, ref):
        want = collate([ref_ds[i] for i in idx], tok.pad_token_id)
        assert b["rows"] == want["rows"] and torch.equal(b["input_ids"], want["input_ids"])
        assert torch.equal(b["roles"], want["roles"]) and torch.equal(b["has_image"], want["has_image"])
        pv, wpv = b["pixel_values"], want["pixel_values"]
        assert (pv is None and wpv is None) or torch.equal(pv, wpv)  # None: a batch of text-only samples
    assert [r for win in got for r in win["rows"]] == [s.row for s in samples]
    assert [it for win in got for it in win["skipped"].items] == skipped.items
    assert all(win["failed"] == [] for win in got)  # every image decodes here
    slots = sum(len(i) * max(lengths[j] for j in i) for i in ref)
    assert sum(w["tokens"] for w in got) == sum(lengths) and sum(w["slots"] for w in got) == slots
