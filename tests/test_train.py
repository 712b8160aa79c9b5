"""The student trainer on tiny models and real caches (CPU).

Exactness (cache at k = V == online teacher), real DataLoader workers, resume, cache/tokenizer
refusals, per-stage trainable parameters, plain-HF checkpoints, logged terms, the NaN policy and
two-process DDP. Every run is a few steps of ``kdcache.train.train``; the caches are dumped once
per module from the session's tiny teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.format import CacheMismatch
from kdcache.config import STAGE_LR, DumpConfig, LossConfig, TrainConfig
from kdcache.dump import dump
from kdcache.train import train
from tests.helpers import dump_small

FP16_UNIT_ROUNDOFF = 2.0**-11  # float16: 10 stored mantissa bits, round to nearest


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def read_samples(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / f"samples-rank{rank}.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """Parameters of a saved model by their in-memory names (plain ``from_pretrained``)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def vocab_size(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["text_config"]["vocab_size"])


@pytest.fixture(scope="module")
def caches(tmp_path_factory, synth_data, tiny_teacher):
    """Caches of the tiny teacher over instruct_small: full-vocabulary float32 / float16 log-probs
    (float32 hidden states), and the product default (top-16, bf16 hidden states)."""
    root = tmp_path_factory.mktemp("train_caches")
    V = vocab_size(tiny_teacher)

    def d(name, **kw):
        return dump_small(tiny_teacher, synth_data, root / name, **kw)

    return {"f32": d("f32.zarr", top_k=V, logprob_dtype="float32", hidden="float32"),
            "f16": d("f16.zarr", top_k=V, logprob_dtype="float16", hidden="float32"),
            "k16": d("k16.zarr", top_k=16), "V": V}


def make_cfg(synth_data, student, out, **kw) -> TrainConfig:
    base = dict(stage="dft", student=str(student), data=str(synth_data["instruct_small"]),
                images=str(synth_data["images_root"]), out=str(out), batch_size=4, num_workers=0,
                log_every=1, max_steps=2)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------
# 1. Exactness: cache at k = V == online teacher


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, synth_data, tiny_student, tiny_teacher, caches):
    """20 DFT steps (4 epochs of 5 batches) three ways, same seed and order, lr 1e-3 so the
    weights move well beyond the comparison tolerance."""
    root = tmp_path_factory.mktemp("exact")
    kw = dict(max_steps=20, lr=1e-3, log_samples=True)
    return {
        "online": train(make_cfg(synth_data, tiny_student, root / "online", teacher=str(tiny_teacher), **kw)),
        "f32": train(make_cfg(synth_data, tiny_student, root / "f32", cache=str(caches["f32"]), **kw)),
        "f16": train(make_cfg(synth_data, tiny_student, root / "f16", cache=str(caches["f16"]), **kw)),
    }


def test_float32_cache_at_full_k_equals_online_teacher(exact_runs, tiny_student):
    on, ca = read_metrics(exact_runs["online"]), read_metrics(exact_runs["f32"])
    assert [m["step"] for m in on] == [m["step"] for m in ca] == list(range(1, 21))
    assert read_samples(exact_runs["online"]) == read_samples(exact_runs["f32"])  # same data order
    for a, b in zip(on, ca):
        for term in ("reg", "res", "vis", "rel", "total"):
            assert abs(a[f"loss/{term}"] - b[f"loss/{term}"]) <= 1e-4, (a["step"], term, a, b)
        assert a["loss/res"] > 0 and a["loss/vis"] > 0 and a["loss/rel"] > 0  # the terms are live
    w_on, w_ca, w0 = weights(exact_runs["online"]), weights(exact_runs["f32"]), weights(tiny_student)
    moved = max(float((w_on[n] - w0[n]).abs().max()) for n in w0)
    assert moved > 1e-2  # training did something the comparison can see
    for n in w0:
        torch.testing.assert_close(w_ca[n], w_on[n], atol=2e-5, rtol=0, msg=n)


def test_float16_cache_within_its_rounding_bound(exact_runs, caches):
    """A float16 cache stays within the bound its rounding implies.

    Rounding moves each cached log-prob l_i by d_i, |d_i| <= D (D <= u max|l|, u = 2^-11); the
    trainer renormalises the buckets (log_softmax), so p'_i = p_i e^{delta_i} with
    |delta_i| <= 2D. With f = log p - log q and sum_i (p'_i - p_i) = 0:

        KL(p'||q) - KL(p||q) = sum_i (p'_i - p_i) f_i + KL(p'||p)
        |first|  <= (e^{2D} - 1) E_p|f|,   E_p|f| <= KL + 2 TV <= KL + sqrt(2 KL)   (Pinsker)
        KL(p'||p) = sum_i p_i (e^{delta_i} - 1) delta_i <= 2D (e^{2D} - 1)

    and, averaged over positions (sqrt is concave), |dL| <= (e^{2D}-1)(L + sqrt(2L) + 2D) with L
    the float32 run's KD term. That holds at step 1, where the student weights are the same; after
    it the runs drift apart, and we assert the practical tolerance, relative 1e-3 on each KD term.
    """
    import math

    from kdcache.cache.reader import CacheReader

    r32 = CacheReader(caches["f32"]).read_range(0, 0, 10**9)
    r16 = CacheReader(caches["f16"]).read_range(0, 0, 10**9)
    assert [r.sample_id for r in r32] == [r.sample_id for r in r16]
    D = max(float((a.topk_logprobs.float() - b.topk_logprobs.float()).abs().max()) for a, b in zip(r32, r16))
    L_max = max(float(a.topk_logprobs.abs().max()) for a in r32)
    assert 0 < D <= FP16_UNIT_ROUNDOFF * L_max  # the cache really is rounded, and only by rounding
    e = math.expm1(2 * D)
    f32, f16 = read_metrics(exact_runs["f32"]), read_metrics(exact_runs["f16"])
    first32, first16 = f32[0], f16[0]
    for term in ("res", "vis"):
        K = first32[f"loss/{term}"]
        assert abs(first16[f"loss/{term}"] - K) <= e * (K + math.sqrt(2 * K) + 2 * D), term
    # CE and the relation term never read the log-probs: equal at equal weights
    assert first16["loss/reg"] == first32["loss/reg"] and first16["loss/rel"] == first32["loss/rel"]
    for a, b in zip(f32, f16):
        for term in ("res", "vis"):
            assert abs(a[f"loss/{term}"] - b[f"loss/{term}"]) <= 1e-3 * a[f"loss/{term}"], (a["step"], term)


def test_every_loss_term_is_logged_and_sums_to_total(exact_runs):
    for m in read_metrics(exact_runs["f32"]):
        for term in ("reg", "res", "vis", "rel", "total"):
            assert np.isfinite(m[f"loss/{term}"]), term
        # defaults: L = L_reg + 1 L_res + 1 L_vis + 0.5 L_rel
        want = m["loss/reg"] + m["loss/res"] + m["loss/vis"] + 0.5 * m["loss/rel"]
        assert m["loss/total"] == pytest.approx(want, abs=1e-5)
        assert m["skipped"] is False and m["grad_norm"] > 0 and m["lr"] > 0


def test_output_is_a_plain_hf_safetensors_checkpoint(exact_runs, synth_data):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = Path(exact_runs["f32"])
    assert (out / "model.safetensors").is_file() and (out / "DONE").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(out.glob("checkpoint-*"))
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    image = Image.open(next(Path(synth_data["images_root"]).glob("*.png"))).convert("RGB")
    inputs = processor(images=image, text="<image>\nWhat is in the image?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()
    meta = json.loads((out / "kdcache_meta.json").read_text())
    assert meta["stages"][-1] == "dft" and meta["projector_trained"] is True


# ---------------------------------------------------------------------------------------------
# 2. Real DataLoader workers


def test_dft_reads_a_real_cache_with_two_workers(tmp_path, synth_data, tiny_student, caches):
    kw = dict(cache=str(caches["k16"]), max_steps=3, log_samples=True)
    w2 = train(make_cfg(synth_data, tiny_student, tmp_path / "w2", num_workers=2, **kw))
    w0 = train(make_cfg(synth_data, tiny_student, tmp_path / "w0", num_workers=0, **kw))
    # the order does not depend on the number of workers, nor the values
    assert read_samples(w2) == read_samples(w0)
    assert len({i for s in read_samples(w2) for i in s["ids"]}) == 12
    # no --lr given: train_config.json records the rate used (the stage's default), not null
    assert json.loads((Path(w2) / "train_config.json").read_text())["lr"] == STAGE_LR["dft"]
    for a, b in zip(read_metrics(w2), read_metrics(w0)):
        for term in ("reg", "res", "vis", "rel", "total"):
            assert a[f"loss/{term}"] == pytest.approx(b[f"loss/{term}"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. Resume


def test_resume_continues_like_an_uninterrupted_run(tmp_path, synth_data, tiny_student, caches, monkeypatch):
    """Crash right before the second checkpoint (steps 4-6 logged but not checkpointed), rerun
    the same command: it resumes at step 3, mid-epoch, and crosses the epoch boundary (5 steps
    per epoch) exactly as the uninterrupted run did."""
    import kdcache.train as T

    kw = dict(cache=str(caches["k16"]), max_steps=8, save_every=3, lr=1e-3, log_samples=True)
    full = train(make_cfg(synth_data, tiny_student, tmp_path / "full", **kw))

    real_save = T._save_checkpoint

    def crash_at_6(ckpt, *args, **kwargs):
        if ckpt.name == "checkpoint-6":
            raise KeyboardInterrupt("simulated crash")
        return real_save(ckpt, *args, **kwargs)

    cfg = make_cfg(synth_data, tiny_student, tmp_path / "cut", **kw)
    monkeypatch.setattr(T, "_save_checkpoint", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(T, "_save_checkpoint", real_save)
    cut = Path(cfg.out)
    ckpt = cut / "checkpoint-3"
    assert (ckpt / "trainer_state.json").is_file() and not (cut / "DONE").exists()
    assert [m["step"] for m in read_metrics(cut)] == [1, 2, 3, 4, 5, 6]
    # the checkpoint: safetensors + a state that loads with weights_only=True only
    assert list(ckpt.glob("*.safetensors")) and not list(ckpt.glob("*.bin"))
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng_cpu"} <= set(state)

    train(cfg)  # the same command again
    a, b = read_metrics(full), read_metrics(cut)
    assert [m["step"] for m in b] == list(range(1, 9))  # the lost tail (4-6) was dropped, then redone
    assert [m["epoch"] for m in b] == [m["epoch"] for m in a] == [0] * 5 + [1] * 3
    assert read_samples(cut) == read_samples(full)
    for x, y in zip(a, b):
        for term in ("reg", "res", "vis", "rel", "total"):
            assert y[f"loss/{term}"] == pytest.approx(x[f"loss/{term}"], abs=1e-6), (x["step"], term)
        assert y["lr"] == pytest.approx(x["lr"])
    w_full, w_cut = weights(full), weights(cut)
    for n in w_full:
        torch.testing.assert_close(w_cut[n], w_full[n], atol=1e-6, rtol=0, msg=n)
    # a finished run is left alone; another command into it is refused
    train(cfg)
    assert len(read_metrics(cut)) == 8
    with pytest.raises(RuntimeError, match="max_steps"):
        train(make_cfg(synth_data, tiny_student, cut, **{**kw, "max_steps": 9}))


def _train_cmd(synth_data, student, cache, out, extra_yaml) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "train", "--stage", "dft", "--student", str(student),
            "--data", str(synth_data["instruct_small"]), "--images", str(synth_data["images_root"]),
            "--cache", str(cache), "--out", str(out), "--num-workers", "0", "--config", str(extra_yaml)]


def test_killed_process_resumes_like_an_uninterrupted_run(tmp_path, synth_data, tiny_student, caches, cli_env,
                                                          capsys):
    """SIGKILL a real ``kdcache train`` process once a checkpoint exists (wherever it is then:
    mid-step, mid-save, mid-log line), run the same command again: same steps, same data order,
    same losses and weights as a run never interrupted."""
    import os
    import signal
    import time

    extra = tmp_path / "extra.yaml"
    extra.write_text("log_every: 1\nlog_samples: true\nmax_steps: 40\nsave_every: 2\nbatch_size: 2\nlr: 1.0e-3\n")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(synth_data, tiny_student, caches["k16"], out, extra), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "DONE").exists()

    cfg = make_cfg(synth_data, tiny_student, out, cache=str(caches["k16"]), max_steps=40, save_every=2,
                   batch_size=2, lr=1e-3, log_samples=True)
    capsys.readouterr()
    train(cfg)  # the same command
    assert "resuming from" in capsys.readouterr().out  # not a fresh start
    ref = train(make_cfg(synth_data, tiny_student, tmp_path / "ref", cache=str(caches["k16"]), max_steps=40,
                         save_every=2, batch_size=2, lr=1e-3, log_samples=True))
    a, b = read_metrics(ref), read_metrics(out)
    assert [m["step"] for m in b] == list(range(1, 41))
    assert read_samples(out) == read_samples(ref)
    for x, y in zip(a, b):
        for term in ("reg", "res", "vis", "rel", "total"):
            assert y[f"loss/{term}"] == pytest.approx(x[f"loss/{term}"], abs=1e-6), (x["step"], term)
    w_ref, w_out = weights(ref), weights(out)
    for n in w_ref:
        torch.testing.assert_close(w_out[n], w_ref[n], atol=1e-6, rtol=0, msg=n)


# ---------------------------------------------------------------------------------------------
# 4. The trainer never trusts a cache


def test_cache_from_another_tokenizer_is_refused(tmp_path, synth_data, tiny_student):
    from kdcache.data.synthetic import make_synthetic
    from kdcache.models import init_model, read_meta, write_meta

    other = make_synthetic(tmp_path / "other", num_images=4, qa_per_image=1, num_val=1, num_eval=1, seed=7,
                           vocab_size=640)
    teacher = Path(init_model(tmp_path / "t2", preset="tiny-teacher", tokenizer=str(other["tokenizer"])))
    write_meta(teacher, {**read_meta(teacher), "projector_trained": True})
    cache = dump(DumpConfig(teacher=str(teacher), data=str(other["instruct"]), images=str(other["images_root"]),
                            out=str(tmp_path / "other.zarr"), top_k=8, num_workers=0))
    assert vocab_size(teacher) != vocab_size(tiny_student)
    with pytest.raises(CacheMismatch) as e:
        train(make_cfg(synth_data, tiny_student, tmp_path / "run", cache=str(cache)))
    msg = str(e.value)
    assert f"vocabulary: cache {vocab_size(teacher)}, student {vocab_size(tiny_student)}" in msg
    assert "tokenizer" in msg and str(cache) in msg
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_sample_whose_tokens_differ_from_the_cache_is_refused(tmp_path, synth_data, tiny_student, caches):
    data = json.loads(Path(synth_data["instruct_small"]).read_text())
    victim = data[7]
    victim["conversations"][-1]["value"] = "purple " + victim["conversations"][-1]["value"]
    edited = tmp_path / "instruct_small_edited.json"
    edited.write_text(json.dumps(data))
    cfg = make_cfg(synth_data, tiny_student, tmp_path / "run", cache=str(caches["k16"]), data=str(edited),
                   max_steps=5)  # one epoch: every sample is read
    # the cache records its data file's sha256: another file is refused at start, nothing trained
    with pytest.raises(CacheMismatch, match=r"was dumped from .*not from this --data .*sha256"):
        train(cfg)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # a cache whose recorded sha256 was edited to match still meets the per-sample token check
    forged = tmp_path / "forged.zarr"
    shutil.copytree(caches["k16"], forged)
    meta = json.loads((forged / "zarr.json").read_text())
    meta["attributes"]["dataset"]["sha256"] = hashlib.sha256(edited.read_bytes()).hexdigest()
    (forged / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatch, match=f"sample '{victim['id']}'.*token ids differ"):
        train(dataclasses.replace(cfg, cache=str(forged), out=str(tmp_path / "run2")))


def test_loss_terms_the_cache_cannot_serve_are_refused(tmp_path, synth_data, tiny_student, tiny_teacher):
    cache = dump(DumpConfig(teacher=str(tiny_teacher), data=str(synth_data["instruct_small"]),
                            images=str(synth_data["images_root"]), out=str(tmp_path / "resp.zarr"), top_k=8,
                            positions=("response",), hidden="none", num_workers=0))
    with pytest.raises(CacheMismatch, match="loss.beta_vis"):
        train(make_cfg(synth_data, tiny_student, tmp_path / "a", cache=str(cache)))
    with pytest.raises(CacheMismatch, match="loss.gamma_rel"):
        train(make_cfg(synth_data, tiny_student, tmp_path / "b", cache=str(cache),
                       loss=LossConfig(beta_vis=0.0)))
    # with the terms it can serve it trains
    out = train(make_cfg(synth_data, tiny_student, tmp_path / "c", cache=str(cache), max_steps=1,
                         loss=LossConfig(beta_vis=0.0, gamma_rel=0.0)))
    assert set(k for k in read_metrics(out)[0] if k.startswith("loss/")) == {"loss/reg", "loss/res", "loss/total"}


# ---------------------------------------------------------------------------------------------
# 5. Trainable parameters per stage


def _groups(names):
    g = {"vision": [], "projector": [], "llm": []}
    for n in names:
        g["vision" if "vision_tower" in n else "projector" if "multi_modal_projector" in n else "llm"].append(n)
    assert all(g.values()), g
    return g


@pytest.mark.parametrize("stage", ["pt", "dpt", "sft", "dft"])
def test_trainable_parameters_per_stage(stage, tmp_path, synth_data, tiny_student, caches):
    extra = {"cache": str(caches["k16"])} if stage in ("dpt", "dft") else {}
    out = train(make_cfg(synth_data, tiny_student, tmp_path / stage, stage=stage, max_steps=1, lr=1e-2, **extra))
    w0, w1 = weights(tiny_student), weights(out)
    changed = {n for n in w0 if not torch.equal(w0[n], w1[n])}
    g = _groups(w0)
    assert not changed & set(g["vision"])  # the vision tower is always frozen
    assert set(g["projector"]) <= changed
    if stage in ("pt", "dpt"):
        assert not changed & set(g["llm"])
    else:
        assert len(changed & set(g["llm"])) > len(g["llm"]) // 2


# ---------------------------------------------------------------------------------------------
# 7. Non-finite losses


@pytest.fixture(scope="module")
def nan_student(tmp_path_factory, tiny_student, caches):
    """A copy of the tiny student whose input embedding of one token is +inf, a token that occurs
    only in the samples of step 3 (batch 4, seed 0, the top-16 cache's order): that step's loss is
    NaN (inf * 0 in the first RMSNorm), every other step's is finite -- a student corrupted the
    way a diverged run leaves one. The cache stays sound (non-finite cached values are refused
    before any step: tests/test_reliability.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kdcache.cache.reader import CacheReader, global_order

    reader = CacheReader(caches["k16"])
    recs = reader.read_range(0, 0, reader.num_samples)
    order = [recs[j] for _part, j in global_order(reader.part_sizes, 0, 0, 64)]
    steps = [order[i:i + 4] for i in range(0, len(order), 4)]
    tokens = [set().union(*(set(r.input_ids.tolist()) for r in st)) for st in steps]
    only_step3 = tokens[2] - set().union(*tokens[:2], *tokens[3:])
    assert only_step3, "no token occurs in step 3 alone: pick another step"
    token = min(only_step3)
    path = tmp_path_factory.mktemp("nan") / "student"
    shutil.copytree(tiny_student, path)
    (f,) = path.glob("*.safetensors")
    w = load_file(f)
    key = next(k for k in w if k.endswith("embed_tokens.weight"))
    w[key][token] = float("inf")
    save_file(w, f, metadata={"format": "pt"})
    return {"path": str(path), "token": token, "victims": [r.sample_id for r in steps[2] if token in r.input_ids],
            "step3": [r.sample_id for r in steps[2]]}


def _finite_but_the_poisoned_row(params: dict[str, torch.Tensor], nan_student) -> bool:
    """Every parameter finite except the student's +inf embedding row, which no step may touch."""
    for name, p in params.items():
        if name.endswith("embed_tokens.weight"):
            row = nan_student["token"]
            assert torch.isinf(p[row]).all(), name
            p = torch.cat([p[:row], p[row + 1:]])
        if not torch.isfinite(p).all():
            return False
    return True


def test_on_nan_stop_raises_naming_the_samples_and_keeps_the_checkpoint(tmp_path, synth_data, caches,
                                                                         nan_student):
    from transformers import LlavaForConditionalGeneration

    cfg = make_cfg(synth_data, nan_student["path"], tmp_path / "run", cache=str(caches["k16"]), max_steps=4,
                   save_every=2, on_nan="stop")
    with pytest.raises(FloatingPointError, match=f"step 3.*{nan_student['victims'][0]}.*on_nan=stop"):
        train(cfg)
    out = Path(cfg.out)
    ckpt = out / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file() and not (out / "DONE").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    model = LlavaForConditionalGeneration.from_pretrained(ckpt)
    assert _finite_but_the_poisoned_row(dict(model.named_parameters()), nan_student)
    torch.load(ckpt / "train_state.pt", weights_only=True)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_on_nan_skip_drops_that_step_and_goes_on(tmp_path, synth_data, caches, nan_student, capsys):
    out = train(make_cfg(synth_data, nan_student["path"], tmp_path / "run", cache=str(caches["k16"]), max_steps=5,
                         on_nan="skip"))
    m = read_metrics(out)
    assert [x["skipped"] for x in m] == [False, False, True, False, False]
    assert not np.isfinite(m[2]["loss/total"])
    assert all(np.isfinite(x["loss/total"]) for i, x in enumerate(m) if i != 2)
    assert m[3]["lr"] == m[2]["lr"]  # the scheduler did not advance on the skipped step
    said = [ln for ln in capsys.readouterr().out.splitlines() if "non-finite loss" in ln]
    assert len(said) == 1 and "step 3" in said[0] and "step skipped (on_nan=skip)" in said[0]
    assert all(sid in said[0] for sid in nan_student["step3"])  # the step's sample ids are logged
    assert _finite_but_the_poisoned_row(weights(out), nan_student)


# ---------------------------------------------------------------------------------------------
# 9. Two processes (DDP over gloo on CPU)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_gradient_accumulation(tmp_path, synth_data, tiny_student, caches, cli_env):
    """``torchrun --nproc-per-node 2 -m kdcache.cli train`` on CPU: the ranks read disjoint samples
    whose union per step is the single-process order, and with batch 1 per rank the averaged DDP
    gradient is exactly grad_accum=2 in one process: same losses, same weights."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("log_every: 1\nlog_samples: true\nmax_steps: 3\nlr: 1.0e-3\n")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "kdcache.cli", "train", "--stage", "dft", "--student", str(tiny_student),
           "--data", str(synth_data["instruct_small"]), "--images", str(synth_data["images_root"]),
           "--cache", str(caches["k16"]), "--out", str(out), "--batch-size", "1", "--num-workers", "0",
           "--config", str(extra)]
    p = subprocess.run(cmd, env=cli_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ref = train(make_cfg(synth_data, tiny_student, tmp_path / "ref", cache=str(caches["k16"]), batch_size=1,
                         grad_accum=2, max_steps=3, lr=1e-3, log_samples=True))
    r0, r1, rs = read_samples(out, 0), read_samples(out, 1), read_samples(ref)
    for a, b, s in zip(r0, r1, rs):
        assert not set(a["ids"]) & set(b["ids"])
        assert a["ids"] + b["ids"] == s["ids"]
    for x, y in zip(read_metrics(out), read_metrics(ref)):
        for term in ("reg", "res", "vis", "rel", "total"):
            assert x[f"loss/{term}"] == pytest.approx(y[f"loss/{term}"], abs=1e-5), (x["step"], term)
    w_ddp, w_ref = weights(out), weights(ref)
    for n in w_ref:
        torch.testing.assert_close(w_ddp[n], w_ref[n], atol=1e-5, rtol=0, msg=n)


def test_all_skipped_training_data_is_one_clear_error(tmp_path, synth_data, tiny_student):
    from kdcache.data.llava import DataError

    wrong = Path(synth_data["images_root"]).parent  # the data dir, not data/images
    with pytest.raises(DataError, match=r"train sft: every sample of .* was skipped \(\d+ missing_image.*"
                                        r"nothing was trained\. Likely fix: --images must be"):
        train(make_cfg(synth_data, tiny_student, tmp_path / "run", stage="sft", images=str(wrong)))
    assert not (tmp_path / "run" / "model.safetensors").exists()
