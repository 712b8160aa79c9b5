"""Every row kind of LLaVA-mix-665k through dump -> verify -> train dft -> export -> eval (issue 15).

One LLaVA JSON holds one row of each kind (text-only ShareGPT rows with ``"model": ""`` and no
``image``, multi-turn, ``<image>`` after the question, numeric-looking and integer ids, an image
in a subfolder, a conversation longer than ``max_length``); it is dumped once per module with
``on_too_long: truncate``, every loss on (relation from the visual hidden states), and each test
checks one kind in the cache, the training run, the Parquet export and the evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdcache.cache.arrow import export_parquet
from kdcache.cache.reader import CacheReader
from kdcache.cache.verify import verify_cache
from kdcache.config import DumpConfig, EvalConfig, TrainConfig, from_dict
from kdcache.data.llava import parse_llava
from kdcache.data.templates import tokenize_sample
from kdcache.dump import dump
from kdcache.evaluate import evaluate
from kdcache.models import image_token_id, load_model, num_image_tokens
from kdcache.positions import KIND_RESPONSE, ROLE_RESPONSE, ROLE_VISUAL
from kdcache.train import train

MAX_LENGTH = 128
ANSWERS = ("red", "blue", "green", "yellow", "purple", "orange")


def _qa(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def rows_of_every_kind() -> list[dict]:
    """One row per kind; ``kind`` is only this test's label (kept by the reader as an extra key)."""
    long = _qa("<image>\nWhat colour is the circle?", "red")
    for j in range(1, 24):  # ~300 tokens: cut to MAX_LENGTH, its last answer is gone
        long += _qa(f"And what colour is object {j}?", ANSWERS[j % len(ANSWERS)])
    long += _qa("And the last one?", "a very distinct final answer")
    return [
        {"id": "plain-1", "kind": "plain", "image": "a.png",
         "conversations": _qa("<image>\nWhat colour is the circle?", "red")},
        {"id": "sharegpt-7", "kind": "text_only", "model": "", "conversations": _qa("What is 2 plus 3?", "5")},
        {"id": "multi-1", "kind": "multi_turn", "image": "b.png",
         "conversations": _qa("<image>\nHow many objects are there?", "2") + _qa("Is there a blue square?", "no")
         + _qa("Where is the red circle?", "top left")},
        {"id": "after-1", "kind": "image_after", "image": "c.png",
         "conversations": _qa("What shape is the red object?\n<image>", "circle")},
        {"id": "000000033471", "kind": "numeric_id", "image": "coco/train2017/000000033471.png",
         "conversations": _qa("<image>\nWhat shape is the red object?", "circle")},
        {"id": 33471, "kind": "int_id", "image": "a.png",
         "conversations": _qa("<image>\nWhat colour is the circle?", "red")},
        {"id": "long-1", "kind": "long", "image": "b.png", "conversations": long},
        {"id": "sharegpt-8", "kind": "text_only_multi", "model": "",
         "conversations": _qa("What is 1 plus 1?", "2") + _qa("And 2 plus 2?", "4")},
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_data, tiny_teacher, tiny_student):
    """The rows JSON (its own image folder), the cache, a DFT run over it (batch 1: every step is
    one sample, so steps of text-only samples are batches without visual positions), its Parquet
    export and an evaluation with the cache's agreement."""
    root = tmp_path_factory.mktemp("rows")
    images = root / "images"
    (images / "coco" / "train2017").mkdir(parents=True)
    src = Path(synth_data["images_root"])
    for name, i in (("a.png", 0), ("b.png", 1), ("c.png", 2)):
        shutil.copy(src / f"train_{i:06d}.png", images / name)
    # the same pixels as c.png under a COCO-style subfolder path
    shutil.copy(src / "train_000002.png", images / "coco" / "train2017" / "000000033471.png")
    rows = rows_of_every_kind()
    data = root / "rows.json"
    data.write_text(json.dumps(rows))
    cache = dump(DumpConfig(teacher=str(tiny_teacher), data=str(data), images=str(images), out=str(root / "c.zarr"),
                            num_workers=0, batch_size=4, max_length=MAX_LENGTH, on_too_long="truncate"))
    run = train(TrainConfig(stage="dft", student=str(tiny_student), data=str(data), images=str(images),
                            out=str(root / "dft"), cache=str(cache), batch_size=1, max_steps=len(rows), num_workers=0,
                            log_every=1, log_samples=True, max_length=MAX_LENGTH, on_too_long="truncate"))
    n_rows = export_parquet(cache, root / "c.parquet")
    report = evaluate(EvalConfig(model=str(run), data=str(data), images=str(images), teacher_cache=str(cache),
                                 max_new_tokens=4))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (run / "samples-rank0.jsonl").read_text().splitlines()]
    reader = CacheReader(cache)
    records = {r.sample_id: r for r in reader.read_range(0, 0, reader.num_samples)}
    return {"root": root, "data": data, "images": images, "rows": rows, "cache": cache, "reader": reader,
            "records": records, "run": run, "table": pq.read_table(root / "c.parquet"), "n_rows": n_rows,
            "report": report, "by_step": {s["ids"][0]: m for s, m in zip(steps, metrics, strict=True)},
            "teacher": tiny_teacher}


def _id(world, kind: str) -> str:
    return str(next(r["id"] for r in world["rows"] if r["kind"] == kind))


def _checked_everywhere(world, sid: str) -> None:
    """The sample is in the cache, was trained on with a finite loss, is exported and evaluated."""
    m = world["by_step"][sid]
    assert all(math.isfinite(m[k]) for k in ("loss/total", "loss/reg", "loss/vis", "loss/rel", "grad_norm"))
    assert (np.asarray(world["table"]["sample_id"].to_pylist()) == sid).sum() == len(world["records"][sid].positions)
    assert sid in {p["id"] for p in world["report"]["predictions"]}


def test_every_row_is_dumped_verified_trained_exported_and_evaluated(world):
    rows = world["rows"]
    assert world["reader"].num_samples == len(rows) and world["reader"].skipped() == []
    assert sorted(world["reader"].rows()) == list(range(len(rows)))
    rep = verify_cache(world["cache"])
    assert rep.ok, str(rep)
    assert set(world["by_step"]) == {str(r["id"]) for r in rows}  # one epoch of batch 1: every row once
    assert world["n_rows"] == sum(len(r.positions) for r in world["records"].values())
    assert world["report"]["num_samples"] == len(rows)
    for r in rows:
        _checked_everywhere(world, str(r["id"]))


@pytest.mark.parametrize("kind", ["text_only", "text_only_multi"])
def test_text_only_rows_have_no_visual_positions_and_zero_visual_losses(world, kind):
    sid = _id(world, kind)
    rec = world["records"][sid]
    assert rec.visual_hidden.shape[0] == 0 and not (rec.roles == ROLE_VISUAL).any()
    assert int((rec.roles == ROLE_RESPONSE).sum()) == len(rec.positions) > 0  # response positions only
    t = world["table"]
    assert {k for i, k in zip(t["sample_id"].to_pylist(), t["kind"].to_pylist()) if i == sid} == {"response"}
    m = world["by_step"][sid]
    # a batch without visual positions: L_vis = L_rel = 0 exactly (not NaN), the other terms train
    assert m["loss/vis"] == 0.0 and m["loss/rel"] == 0.0
    assert m["loss/reg"] > 0 and m["loss/res"] > 0 and 0 < m["grad_norm"] < math.inf
    # ... and image samples of the same run have both terms
    img = world["by_step"][_id(world, "plain")]
    assert img["loss/vis"] > 0 and img["loss/rel"] > 0


def test_multi_turn_row_distils_every_answer(world):
    rec = world["records"][_id(world, "multi_turn")]
    resp = (rec.roles == ROLE_RESPONSE).numpy().astype(np.int8)
    assert int((np.diff(resp) == 1).sum()) == 3  # three separate answer runs ...
    assert int((rec.kinds == KIND_RESPONSE).sum()) == int(resp.sum())  # ... each token a distilled target


def _tokenize(world, row: dict, max_length=MAX_LENGTH):
    model, processor = load_model(world["teacher"])
    s = parse_llava([row])[0]
    return tokenize_sample(s, processor.tokenizer, template="chat", image_token_id=image_token_id(model.config),
                           num_image_tokens=num_image_tokens(model.config, processor), max_length=max_length,
                           on_too_long="truncate")


def test_image_after_the_question_is_moved_to_the_front_like_llava(world):
    row = next(r for r in world["rows"] if r["kind"] == "image_after")
    front = dict(row, conversations=_qa("<image>\nWhat shape is the red object?", "circle"))
    rec = world["records"][_id(world, "image_after")]
    assert np.array_equal(rec.input_ids.numpy(), _tokenize(world, front).input_ids)
    assert rec.visual_hidden.shape[0] == int((rec.roles == ROLE_VISUAL).sum()) > 0


def test_numeric_looking_and_integer_ids_keep_their_spelling(world):
    ids = set(world["reader"].sample_ids(world["reader"].parts[0], np.arange(world["reader"].num_samples)))
    assert {"000000033471", "33471"} <= ids  # leading zeros kept; the JSON integer as its decimal string
    exported = set(world["table"]["sample_id"].to_pylist())
    assert {"000000033471", "33471"} <= exported
    assert world["records"]["33471"].row == 5 and world["records"]["000000033471"].row == 4
    # same question, same pixels as plain-1: the integer-id row's targets equal it
    a, b = world["records"]["plain-1"], world["records"]["33471"]
    assert np.array_equal(a.topk_ids.numpy(), b.topk_ids.numpy())


def test_image_in_a_subfolder_is_read(world):
    """coco/train2017/000000033471.png holds c.png's pixels: same visual hidden states as after-1."""
    sub, top = world["records"]["000000033471"], world["records"][_id(world, "image_after")]
    assert sub.visual_hidden.shape == top.visual_hidden.shape and sub.visual_hidden.shape[0] > 0
    assert np.array_equal(sub.visual_hidden.float().numpy(), top.visual_hidden.float().numpy())


def test_long_conversation_is_truncated_to_max_length(world):
    sid = _id(world, "long")
    rec = world["records"][sid]
    row = next(r for r in world["rows"] if r["kind"] == "long")
    full = _tokenize(world, row, max_length=None)
    assert full.num_tokens > MAX_LENGTH == rec.num_tokens
    assert np.array_equal(rec.input_ids.numpy(), full.input_ids[:MAX_LENGTH])  # the head, cut at the tail
    assert world["reader"].attrs["settings"]["truncate"] is True
    assert int(rec.positions.max()) < MAX_LENGTH
    # the evaluation's reference answer was cut off in the cache: no agreement there, listed as missing
    assert world["report"]["agreement"]["missing"] == [sid]
    assert world["report"]["agreement"]["samples"] == len(world["rows"]) - 1


def test_training_a_truncated_cache_needs_the_same_cut(world, tiny_student, tmp_path):
    from kdcache.cache.format import CacheMismatch

    base = dict(stage="dft", student=str(tiny_student), data=str(world["data"]), images=str(world["images"]),
                out=str(tmp_path / "run"), cache=str(world["cache"]), batch_size=2, max_steps=1, num_workers=0)
    with pytest.raises(CacheMismatch, match=rf"--on-too-long truncate --max-length {MAX_LENGTH}$"):
        train(TrainConfig(**base, max_length=MAX_LENGTH))  # on_too_long skip
    with pytest.raises(CacheMismatch, match=rf"--on-too-long truncate --max-length {MAX_LENGTH}$"):
        train(TrainConfig(**base, max_length=MAX_LENGTH + 1, on_too_long="truncate"))


def test_rerun_of_a_finished_run_compares_paths_by_what_they_name(world, tiny_student, tmp_path, monkeypatch):
    """Issue 15, section 3, for train: the run's data spelled ./rows.json from its folder, or a
    copy with the same bytes elsewhere, is the same run (nothing to do); another setting is
    refused naming it."""
    from kdcache.train import RunMismatchError

    moved = tmp_path / "elsewhere" / "rows.json"
    moved.parent.mkdir()
    shutil.copy(world["data"], moved)
    saved = json.loads((world["run"] / "train_config.json").read_text())
    before = (world["run"] / "metrics.jsonl").read_text()
    monkeypatch.chdir(world["root"])
    for data in ("./rows.json", str(moved)):
        again = from_dict(TrainConfig, {**saved, "data": data, "out": "./dft"})
        assert train(again) == Path("./dft")
    assert (world["run"] / "metrics.jsonl").read_text() == before
    with pytest.raises(RunMismatchError, match=r"lr: 2e-05 then, 0\.001 now.*use a new --out"):
        train(from_dict(TrainConfig, {**saved, "data": "./rows.json", "lr": 1e-3}))
    moved.write_text(moved.read_text().replace('"5"', '"6"'))  # other content under the moved name
    with pytest.raises(RunMismatchError, match=r"data: '.*rows\.json' then, '.*elsewhere/rows\.json' now"):
        train(from_dict(TrainConfig, {**saved, "data": str(moved)}))


def test_mixed_batch_averages_visual_terms_over_the_samples_with_an_image(world, tiny_student):
    """``batch_losses`` on real cache records: [image, text-only] gives the image sample's own L_vis
    and L_rel (both are means over visual positions / samples with an image, the text-only row
    adds nothing to them); [text-only, text-only] gives L_vis = L_rel = 0 exactly, a finite total
    and finite, non-zero gradients (L_reg and L_res still train)."""
    import torch

    from kdcache.data.collate import LlavaTorchDataset, collate, prepare_samples
    from kdcache.data.llava import read_llava_json
    from kdcache.target_kinds import parse_targets
    from kdcache.train import TeacherSide, batch_losses, pack_records

    student, processor = load_model(tiny_student)
    kept, toks, skipped = prepare_samples(
        read_llava_json(world["data"]), processor.tokenizer, images_root=world["images"], template="chat",
        image_token_id=image_token_id(student.config), num_image_tokens=num_image_tokens(student.config, processor),
        max_length=MAX_LENGTH, on_too_long="truncate")
    assert skipped.total == 0
    ds = LlavaTorchDataset.from_prepared(kept, toks, processor.image_processor, world["images"])
    by_id = {s.id: i for i, s in enumerate(kept)}
    side = TeacherSide(gram=torch.as_tensor(world["reader"].gram()), lm_head=None, temperature=1.0,
                       targets=parse_targets(world["reader"].attrs["settings"]["targets"]))
    cfg = TrainConfig(stage="dft", student=str(tiny_student), data=str(world["data"]), images=str(world["images"]),
                      out="unused", cache=str(world["cache"]))

    def terms(ids, grad=False):
        student.zero_grad(set_to_none=True)
        batch = collate([ds[by_id[i]] for i in ids], processor.tokenizer.pad_token_id)
        t = batch_losses(student, batch, pack_records([world["records"][i] for i in ids]), side, cfg)
        if grad:
            t["total"].backward()
        return {k: v.detach() for k, v in t.items()}

    alone, mixed = terms(["plain-1"]), terms(["plain-1", "sharegpt-7"])
    assert alone["vis"] > 0 and alone["rel"] > 0
    torch.testing.assert_close(mixed["vis"], alone["vis"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed["rel"], alone["rel"], rtol=1e-4, atol=1e-6)
    none = terms(["sharegpt-7", "sharegpt-8"], grad=True)
    assert none["vis"].item() == 0.0 and none["rel"].item() == 0.0
    assert torch.isfinite(none["total"]) and none["reg"] > 0 and none["res"] > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
