"""Evaluation: answer normalisation, scoring, the end-to-end report, and teacher agreement.

Real tiny random-init models and a real synthetic dataset; no mocks. Random weights answer
nonsense, so accuracy is tested through ``score`` on hand cases and the end-to-end run checks the
report's structure, counts and self-consistency; agreement is checked against identities
(student == teacher gives top-1 agreement 1 and KL 0) and the top-k bound (KL over k+1 buckets
<= the full-vocabulary KL).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kdcache.config import EvalConfig
from kdcache.data.llava import DataError, LlavaSample, SampleError, read_llava_json
from kdcache.data.synthetic import QUESTION_TYPES, make_synthetic
from kdcache.evaluate import (
    ALL_TYPES,
    evaluate,
    format_report,
    forward_smoke,
    last_answer_positions,
    normalize_answer,
    reference_of,
    score,
)
from kdcache.models import init_model
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL

N_EVAL = 10  # two of each of the five question types (types cycle)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = make_synthetic(root / "data", num_images=2, qa_per_image=1, num_val=0, num_eval=N_EVAL, seed=0)
    student = init_model(root / "student", preset="tiny-student", tokenizer=str(paths["tokenizer"]))
    teacher = init_model(root / "teacher", preset="tiny-teacher", tokenizer=str(paths["tokenizer"]), seed=1)
    # A mixed file: the synthetic eval samples plus a generic text-only LLaVA sample (no
    # question_type/answer keys: its reference is the last gpt turn, its type "all").
    mixed = json.loads(paths["eval"].read_text())
    mixed.append({"id": "text-0", "conversations": [
        {"from": "human", "value": "What is 1 plus 1?"}, {"from": "gpt", "value": "2"},
        {"from": "human", "value": "Write the number 3 as a word."}, {"from": "gpt", "value": "three"}]})
    (root / "mixed.json").write_text(json.dumps(mixed))
    return {"root": root, "paths": paths, "student": str(student), "teacher": str(teacher),
            "mixed": str(root / "mixed.json"), "images": str(paths["images_root"])}


def _cfg(world, **kw) -> EvalConfig:
    base = dict(model=world["student"], data=str(world["paths"]["eval"]), images=world["images"],
                batch_size=4, max_new_tokens=4)
    base.update(kw)
    return EvalConfig(**base)


# ---- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize("pred, ref", [
    ("The Red.", "red"), ("  RED ", "red"), ("red!", "Red"), ("top-left", "top left"),
    ("the top left.", "top left"), ("two", "2"), ("Two.", "2"), ("an apple", "apple"),
    ("Yes", "yes"), ("ten", "10"),
])  # fmt: skip
def test_normalisation_equal(pred, ref):
    assert normalize_answer(pred) == normalize_answer(ref)


@pytest.mark.parametrize("pred, ref", [
    ("red", "green"), ("yes", "no"), ("2", "3"), ("someone", "some 1"), ("top", "top left"),
    ("red circle", "red"), ("", "red"),
    ("at the top left", "top left"),  # exact match: only articles are dropped, not prepositions
])  # fmt: skip
def test_normalisation_different(pred, ref):
    assert normalize_answer(pred) != normalize_answer(ref)


def test_normalisation_values():
    assert normalize_answer("The Red.") == "red"
    assert normalize_answer("Two") == "2"  # number words map to digits (documented decision)
    assert normalize_answer("A  blue\tsquare, at the TOP-right!") == "blue square at top right"
    assert normalize_answer("...") == ""


def test_score_perfect_and_averages():
    refs = ["red", "circle", "2", "top left", "yes", "no"]
    types = ["colour", "shape", "count", "position", "yesno", "yesno"]
    perfect = score(["The red.", "Circle", "two", "Top-left", "YES", "no."], refs, types)
    assert perfect["micro"] == 1.0 and perfect["macro"] == 1.0
    assert perfect["correct"] == [True] * 6
    assert perfect["per_type"]["yesno"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert list(perfect["per_type"]) == sorted(set(types))

    # micro weighs samples, macro weighs types: 3/3 of type a and 0/1 of type b
    s = score(["x", "y", "z", "w"], ["x", "y", "z", "v"], ["a", "a", "a", "b"])
    assert s["micro"] == pytest.approx(0.75)
    assert s["macro"] == pytest.approx(0.5)
    assert s["per_type"]["b"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert s["n"] == 4


def test_score_edge_cases():
    empty = score([], [], [])
    assert empty["n"] == 0 and math.isnan(empty["micro"]) and math.isnan(empty["macro"])
    with pytest.raises(ValueError, match="one reference and one type per prediction"):
        score(["a"], ["a", "b"], ["t"])


def test_reference_of():
    syn = LlavaSample("e0", 0, "x.png", [("user", "<image>\nQ"), ("assistant", "Red")],
                      {"question_type": "colour", "answer": "red"})
    assert reference_of(syn) == ("red", "colour")  # the answer key wins over the gpt turn
    generic = LlavaSample("g0", 1, None, [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")])
    assert reference_of(generic) == ("d", ALL_TYPES)
    open_q = LlavaSample("g1", 2, None, [("user", "a")])
    with pytest.raises(SampleError, match="no_response"):
        reference_of(open_q)


def test_last_answer_positions():
    P, V, R = ROLE_PROMPT, ROLE_VISUAL, ROLE_RESPONSE
    roles = np.array([P, V, V, P, R, R, P, P, R, R, R, P], dtype=np.uint8)
    # the last answer is tokens 8..10, predicted by the outputs at 7..9
    assert last_answer_positions(roles).tolist() == [7, 8, 9]
    assert last_answer_positions(np.array([P, R, R], dtype=np.uint8)).tolist() == [0, 1]
    assert last_answer_positions(np.array([P, P], dtype=np.uint8)).tolist() == []


# ---- end to end ------------------------------------------------------------------------------


def test_evaluate_end_to_end_writes_report(world, tmp_path):
    out = tmp_path / "sub" / "report.json"
    report = evaluate(_cfg(world, out=str(out)))
    assert out.is_file()
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(report))  # the file is the returned report

    data = read_llava_json(world["paths"]["eval"])
    assert report["num_samples"] == N_EVAL and report["skipped"] == {}
    assert set(report["per_type"]) == set(QUESTION_TYPES)
    for t, v in report["per_type"].items():
        assert v["n"] == N_EVAL // len(QUESTION_TYPES)
        assert v["accuracy"] == pytest.approx(v["correct"] / v["n"])
    preds = report["predictions"]
    assert [p["id"] for p in preds] == [s.id for s in data]
    for p, s in zip(preds, data):
        assert p["reference"] == s.extra["answer"] and p["type"] == s.extra["question_type"]
        assert p["correct"] == (normalize_answer(p["prediction"]) == normalize_answer(p["reference"]))
        assert isinstance(p["prediction"], str)
    n_correct = sum(p["correct"] for p in preds)
    assert report["accuracy_micro"] == pytest.approx(n_correct / N_EVAL)
    assert report["accuracy_macro"] == pytest.approx(np.mean([v["accuracy"] for v in report["per_type"].values()]))
    assert report["agreement"] is None

    text = format_report(report)
    for t in QUESTION_TYPES:
        assert t in text
    assert "micro (samples)" in text and "macro (types)" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines[:3]}) == 1  # an aligned table


def test_batched_generation_matches_one_at_a_time(world):
    """Left padding must not change a greedy answer: batch of 4 (mixed text-only + image) == batch of 1."""
    kw = dict(data=world["mixed"], max_new_tokens=6)
    one = evaluate(_cfg(world, batch_size=1, **kw))
    many = evaluate(_cfg(world, batch_size=4, **kw))
    assert [p["prediction"] for p in one["predictions"]] == [p["prediction"] for p in many["predictions"]]
    assert many["per_type"][ALL_TYPES]["n"] == 1  # the generic text-only sample
    assert many["predictions"][-1]["reference"] == "three"  # its last gpt turn
    assert any(p["prediction"] for p in many["predictions"])  # something was generated


def test_limit_and_max_length_skip(world, tmp_path):
    r = evaluate(_cfg(world, limit=3))
    assert r["num_samples"] == 3
    # a prompt of 16 image tokens + text cannot fit in 20 tokens: every sample skipped is an error
    # naming the counts and the fix (a report of 0 scored samples would read as a result)
    out = tmp_path / "empty.json"
    with pytest.raises(DataError, match=rf"eval: every sample of .* was skipped \({N_EVAL} too_long.*nothing "
                                        r"was scored\. Likely fix: raise max_length"):
        evaluate(_cfg(world, max_length=20, out=str(out)))
    assert not out.exists()
    wrong = str(Path(world["images"]).parent)  # one level above the images
    with pytest.raises(DataError, match=rf"{N_EVAL} missing_image.*--images must be"):
        evaluate(_cfg(world, images=wrong))


# ---- agreement -------------------------------------------------------------------------------


def _answer_positions(world, data_path, model_dir):
    """Number of reference-answer positions (answer tokens + end-of-turn) per the tokenizer."""
    from kdcache.data.templates import tokenize_sample
    from kdcache.models import load_model, num_image_tokens, image_token_id

    model, proc = load_model(model_dir)
    n = 0
    for s in read_llava_json(data_path):
        t = tokenize_sample(s, proc.tokenizer, template="chat", image_token_id=image_token_id(model.config),
                            num_image_tokens=num_image_tokens(model.config, proc), max_length=None)
        n += len(last_answer_positions(t.roles))
    return n


def test_agreement_with_itself_is_perfect(world):
    r = evaluate(_cfg(world, data=world["mixed"], teacher=world["student"]))
    a = r["agreement"]
    assert a["samples"] == N_EVAL + 1 and a["missing"] == []
    assert a["positions"] == _answer_positions(world, world["mixed"], world["student"])
    assert a["top1_agreement"] == 1.0
    assert abs(a["kl"]) < 1e-5
    assert "agreement with teacher:" in format_report(r)


def _write_cache(world, path, data_path, *, k):
    """A real cache of the tiny teacher over ``data_path`` (float32 log-probs, top-k + tail)."""
    from kdcache.cache.format import make_attrs
    from kdcache.cache.writer import CacheWriter
    from kdcache.data.collate import LlavaTorchDataset, collate
    from kdcache.models import config_hash, image_token_id, load_model, num_image_tokens, tokenizer_hash
    from kdcache.teacher import teacher_records

    model, proc = load_model(world["teacher"])
    model.eval()
    tok = proc.tokenizer
    n_img = num_image_tokens(model.config, proc)
    samples = read_llava_json(data_path)
    attrs = make_attrs(
        {"name_or_path": world["teacher"], "config_hash": config_hash(model.config),
         "vocab_size": int(model.lm_head.weight.shape[0]), "hidden_size": int(model.lm_head.weight.shape[1]),
         "dtype": "float32", "num_image_tokens": n_img},
        {"name_or_path": world["teacher"], "vocab_hash": tokenizer_hash(tok), "template": "chat",
         "template_hash": "x"},
        {"path": str(data_path), "num_rows": len(samples), "sha256": "0" * 64},
        {"top_k": k, "positions": ["visual", "response"], "logprob_dtype": "float32", "hidden": "none",
         "temperature": 1.0, "relation": "none", "max_length": 2048, "world_size": 1, "targets": "topk"},
    )
    ds = LlavaTorchDataset(samples, tok, proc.image_processor, world["images"], template="chat",
                           image_token_id=image_token_id(model.config), num_image_tokens=n_img, max_length=None)
    with CacheWriter(path, attrs) as w:
        for s0 in range(0, len(ds), 4):
            batch = collate([ds[i] for i in range(s0, min(s0 + 4, len(ds)))], tok.pad_token_id)
            for rec in teacher_records(model, batch, kinds=("visual", "response"), top_k=k, with_hidden=False):
                w.add(rec)
    return path


def test_agreement_cache_matches_online_teacher(world, tmp_path):
    """Cache (k=8 + tail) and online teacher (k=V) agree on top-1; the coarsened KL is <= the full KL."""
    cache = _write_cache(world, tmp_path / "t.zarr", world["mixed"], k=8)
    cached = evaluate(_cfg(world, data=world["mixed"], teacher_cache=str(cache)))["agreement"]
    online = evaluate(_cfg(world, data=world["mixed"], teacher=world["teacher"]))["agreement"]
    assert cached["source"].startswith("cache:") and online["source"].startswith("teacher:")
    assert cached["positions"] == online["positions"] == _answer_positions(world, world["mixed"], world["student"])
    assert cached["top1_agreement"] == pytest.approx(online["top1_agreement"])
    assert 0.0 < cached["kl"] <= online["kl"] + 1e-6  # KL over k+1 buckets never exceeds the full KL
    # and a cache of the student itself is an identity, as online
    own = tmp_path / "s.zarr"
    world_s = dict(world, teacher=world["student"])
    _write_cache(world_s, own, world["mixed"], k=8)
    a = evaluate(_cfg(world, data=world["mixed"], teacher_cache=str(own)))["agreement"]
    assert a["top1_agreement"] == 1.0 and abs(a["kl"]) < 1e-5


def test_cache_of_another_file_is_refused(world, tmp_path):
    cache = _write_cache(world, tmp_path / "t.zarr", world["mixed"], k=4)
    with pytest.raises(ValueError, match="dump the cache from the evaluation JSON"):
        evaluate(_cfg(world, teacher_cache=str(cache)))  # eval.json has one row fewer than mixed.json


def test_teacher_and_cache_together_refused(world):
    with pytest.raises(ValueError, match="at most one"):
        evaluate(_cfg(world, teacher=world["student"], teacher_cache="x.zarr"))


# ---- forward smoke ---------------------------------------------------------------------------


def test_forward_smoke(world):
    lines = forward_smoke(world["student"], str(world["paths"]["instruct"]), world["images"], batch_size=2)
    text = "\n".join(lines)
    vocab = len(json.loads((world["paths"]["tokenizer"] / "tokenizer.json").read_text())["model"]["vocab"])
    assert "pixel_values: (2, 3, 64, 64)" in text
    assert "visual tokens per image: 16 (in the batch: [16, 16])" in text
    logits = next(line for line in lines if line.startswith("logits:"))
    assert logits.endswith(f", {vocab})")
    loss = float(next(line for line in lines if line.startswith("loss:")).split()[1])
    assert math.isfinite(loss) and loss > 0
    ids = next(line for line in lines if line.startswith("input_ids:"))
    assert ids.startswith("input_ids: (2, ")
