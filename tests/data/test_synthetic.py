"""The synthetic dataset: reproducible, answers checkable against the pixels, a working tokenizer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from kdcache.data.llava import read_llava_json
from kdcache.data.synthetic import CELLS, COLOURS, QUESTION_TYPES, SHAPES, make_split_subset, make_synthetic

KW = dict(num_images=10, qa_per_image=4, num_val=5, num_eval=10, seed=3, num_text_only=3, student_images=4)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), **KW)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reproducible_byte_for_byte(syn, tmp_path):
    again = make_synthetic(tmp_path / "again", **KW)
    a, b = _files(syn["root"]), _files(again["root"])
    assert a.keys() == b.keys()
    assert {"captions.json", "instruct.json", "val.json", "eval.json", "tokenizer/tokenizer.json"} <= a.keys()
    for k in a:
        assert a[k] == b[k], k
    other = _files(make_synthetic(tmp_path / "other", **{**KW, "seed": 4})["root"])
    assert other["instruct.json"] != a["instruct.json"]
    assert other["images/train_000000.png"] != a["images/train_000000.png"] or other["images/train_000001.png"] != a["images/train_000001.png"]


def test_splits_and_held_out_images(syn):
    cap, ins = read_llava_json(syn["captions"]), read_llava_json(syn["instruct"])
    val, ev = read_llava_json(syn["val"]), read_llava_json(syn["eval"])
    assert len(cap) == 10 and len(ins) == 13 and len(val) == 5 and len(ev) == 10
    train_imgs = {s.image for s in ins if s.image}
    assert train_imgs == {s.image for s in cap} and len(train_imgs) == 10
    held = {s.image for s in val} | {s.image for s in ev}
    assert len(held) == 15 and not held & train_imgs
    for s in cap:
        assert len(s.turns) == 2 and s.turns[0][1].count("<image>") == 1
    for s in ins:
        if s.image:
            assert len(s.turns) == 8 and s.turns[0][1].count("<image>") == 1
            assert all("<image>" not in t for _, t in s.turns[1:])
            assert all(1 <= len(t.split()) <= 2 for r, t in s.turns if r == "assistant")
        else:
            assert len(s.turns) == 2
    for s in val + ev:
        assert len(s.turns) == 2 and s.extra["question_type"] in QUESTION_TYPES
        assert s.extra["answer"] == s.turns[1][1]
    assert [s.extra["question_type"] for s in ev] == list(QUESTION_TYPES) * 2  # balanced
    for p in (syn["images_root"] / s.image for s in cap + val + ev):
        with Image.open(p) as im:
            assert im.size == (64, 64) and im.mode == "RGB"


def test_answers_match_the_pixels(syn):
    """Position answers put an object of the asked colour at the centre of the answered cell."""
    checked = 0
    for split in ("val", "eval", "instruct"):
        for s in read_llava_json(syn[split]):
            if not s.image:
                continue
            im = Image.open(syn["images_root"] / s.image).convert("RGB")
            for (_, q), (_, a) in zip(s.turns[::2], s.turns[1::2]):
                if not q.replace("<image>", "").strip().startswith("Where is the"):
                    continue
                colour, shape = q.replace("<image>", "").strip()[len("Where is the ") : -1].split()
                assert colour in COLOURS and shape in SHAPES and a in CELLS
                k = CELLS.index(a)
                cx, cy = int((k % 3 + 0.5) * 64 / 3), int((k // 3 + 0.5) * 64 / 3)
                assert im.getpixel((cx, cy)) == COLOURS[colour], (s.id, q, a)
                checked += 1
    assert checked >= 2


def test_tokenizer(syn):
    tok = AutoTokenizer.from_pretrained(syn["tokenizer"])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert 256 < len(tok) <= 768
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "Yo"}]
    assert tok.apply_chat_template(sys_msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    for s in read_llava_json(syn["instruct"]):
        for _, text in s.turns:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert len(ids) <= len(text.split()) + 4  # words of the corpus are merged, not spelled out
    assert tok.decode(tok("é ✓ unseen", add_special_tokens=False)["input_ids"]) == "é ✓ unseen"  # byte fallback


def test_student_subset(syn, tmp_path):
    small = read_llava_json(syn["instruct_small"])
    assert {s.image for s in small if s.image} == {f"train_{i:06d}.png" for i in range(4)}
    assert sum(not s.image for s in small) == 3  # text-only kept
    assert len(read_llava_json(syn["captions_small"])) == 4
    out = make_split_subset(syn["instruct"], tmp_path / "sub.json", num_images=3, seed=0)
    sub = read_llava_json(out)
    assert len({s.image for s in sub if s.image}) == 3 and sum(not s.image for s in sub) == 3
    again = make_split_subset(syn["instruct"], tmp_path / "sub2.json", num_images=3, seed=0)
    assert out.read_bytes() == again.read_bytes()
    first = read_llava_json(make_split_subset(syn["instruct"], tmp_path / "first.json", num_images=2))
    assert {s.image for s in first if s.image} == {"train_000000.png", "train_000001.png"}
    with pytest.raises(ValueError, match="distinct images"):
        make_split_subset(syn["instruct"], tmp_path / "x.json", num_images=11)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_objects"):
        make_synthetic(tmp_path, num_images=1, qa_per_image=1, num_val=0, num_eval=0, seed=0, max_objects=9)
    with pytest.raises(ValueError, match="student_images"):
        make_synthetic(tmp_path, num_images=2, qa_per_image=1, num_val=0, num_eval=0, seed=0, student_images=3)


@pytest.mark.slow
def test_full_size_is_fast(tmp_path):
    t0 = time.perf_counter()
    p = make_synthetic(tmp_path, num_images=12_000, qa_per_image=5, num_val=200, num_eval=500, seed=0)
    dt = time.perf_counter() - t0
    assert len(read_llava_json(p["instruct"])) == 12_000
    assert dt < 60, f"make_synthetic took {dt:.1f} s for 12k images + 60k QA"
