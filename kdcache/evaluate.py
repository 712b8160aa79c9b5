"""Evaluate a model: exact-match accuracy per question type, and agreement with a teacher.

    kdcache eval --model runs/s-dft --data data/eval.json --images data/images --out eval.json
    kdcache eval ... --teacher-cache caches/teacher-eval.zarr     # + top-1 agreement and KL
    kdcache forward --model models/teacher --data data/instruct.json --images data/images

Accuracy. Each sample's last question is answered by batched greedy generation (left-padded
prompts from ``tokenize_prompt``: the conversation through the last human turn plus the
generation prompt, ``<image>`` expanded to the model's visual-token count), stopped at eos /
``<|im_end|>`` / ``<|endoftext|>`` or after ``max_new_tokens``. The prediction and the reference
are normalised (``normalize_answer``) and compared for equality. The reference is the sample's
``answer`` key when it has one (our synthetic val/eval splits), else its last gpt turn; the
question type is its ``question_type`` key, else ``"all"``.

    per type t:  acc_t = (# correct of type t) / n_t
    micro     :  sum_t correct_t / sum_t n_t       (every sample weighs the same)
    macro     :  mean_t acc_t                      (every question type weighs the same)

Agreement (``teacher_cache`` or ``teacher``). On the reference answer's response positions P (the
outputs that predict the last gpt turn's tokens and its end-of-turn token), with a teacher-forced
student pass over the full conversation (``tokenize_sample``):

    top-1 agreement = mean_{t in P} [argmax_v log q_t(v) == teacher top-1 id]
    KL              = mean_{t in P} KL(p_t || q_t) over the teacher's k ids + the tail bucket

Both are micro-averaged over positions. The teacher is either a cache dumped from the same JSON
with the ``response`` position kind, or a model run online through ``teacher_records`` with
k = V (then the tail bucket is empty and the KL is the full-vocabulary KL). Samples the cache
lacks (the dump skipped them) or holds cut short (``--on-too-long truncate``: the reference
answer may be gone) are listed as ``missing``.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import EvalConfig
from .generation import generate_batch, left_pad, stop_token_ids
from .positions import KIND_RESPONSE, ROLE_RESPONSE, ROLE_VISUAL

ALL_TYPES = "all"  # question type of samples without a ``question_type`` key

# Number words are mapped to digits: the synthetic count answers are digits ("2") and a model
# that says "two" has answered correctly. Only whole tokens are mapped ("someone" stays).
NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
NORMALISATION = (
    "lowercase; punctuation -> space; articles (a, an, the) dropped; number words zero..ten -> "
    "digits; whitespace collapsed"
)


# ----------------------------------------------------------------------------------------------
# scoring: pure functions


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for exact match (see ``NORMALISATION``).

    ``"The Red."`` -> ``"red"``; ``"Two"`` -> ``"2"``; ``"top-left"`` -> ``"top left"``.
    """
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def score(predictions: Sequence[str], references: Sequence[str], types: Sequence[str]) -> dict[str, Any]:
    """Exact match after ``normalize_answer``, per question type and averaged.

    Returns ``{"per_type": {type: {"n", "correct", "accuracy"}}, "micro": float, "macro": float,
    "n": int, "correct": list[bool]}``; types are sorted by name. Accuracies are fractions in
    [0, 1]; with no samples micro and macro are NaN.
    """
    if not len(predictions) == len(references) == len(types):
        raise ValueError(
            f"score needs one reference and one type per prediction, got {len(predictions)} predictions, "
            f"{len(references)} references, {len(types)} types"
        )
    correct = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    n_t: Counter[str] = Counter(types)
    c_t: Counter[str] = Counter(t for t, ok in zip(types, correct) if ok)
    per_type = {t: {"n": n_t[t], "correct": c_t[t], "accuracy": c_t[t] / n_t[t]} for t in sorted(n_t)}
    n = len(correct)
    micro = sum(correct) / n if n else float("nan")
    macro = float(np.mean([v["accuracy"] for v in per_type.values()])) if per_type else float("nan")
    return {"per_type": per_type, "micro": micro, "macro": macro, "n": n, "correct": correct}


def reference_of(sample) -> tuple[str, str]:
    """(reference answer, question type) of an eval sample.

    The ``answer`` / ``question_type`` keys of our synthetic splits when present, else the last
    gpt turn and ``ALL_TYPES``. Raises SampleError('no_response') when there is no reference.
    """
    from .data.llava import ROLE_ASSISTANT, SampleError

    qtype = str(sample.extra["question_type"]) if "question_type" in sample.extra else ALL_TYPES
    if "answer" in sample.extra:
        return str(sample.extra["answer"]), qtype
    if sample.turns[-1][0] != ROLE_ASSISTANT:
        raise SampleError.of(sample, "no_response", "no 'answer' key and the conversation does not end with a gpt turn")
    return sample.turns[-1][1], qtype


def last_answer_positions(roles: np.ndarray) -> np.ndarray:
    """Output positions that predict the last response run (the reference answer + its end-of-turn).

    roles uint8 [T] -> int64 [P]: t such that token t+1 is in the final maximal run of
    ROLE_RESPONSE tokens. Empty when there is no response token.
    """
    roles = np.asarray(roles)
    resp = np.nonzero(roles == ROLE_RESPONSE)[0]
    if len(resp) == 0:
        return np.zeros(0, dtype=np.int64)
    end = int(resp[-1])
    start = end
    while start > 0 and roles[start - 1] == ROLE_RESPONSE:
        start -= 1
    return np.arange(start - 1, end, dtype=np.int64)  # output at t predicts token t+1


# ----------------------------------------------------------------------------------------------
# model-side helpers


@dataclass
class _Item:
    sample: Any  # LlavaSample
    reference: str
    qtype: str
    prompt: Any  # Tokenized: generation prompt
    full: Any | None  # Tokenized: whole conversation, for the teacher-forced agreement pass


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _load(name: str, device: torch.device, flag: str = "--model"):
    from .models import default_dtype, load_model

    dtype = default_dtype(device)
    model, processor = load_model(name, dtype=dtype, device=device, flag=flag)
    model.requires_grad_(False).eval()
    return model, processor


def _pixels(samples, image_processor, images_root: str) -> torch.Tensor | None:
    """[n_img, 3, H, W] for the samples with an image, in order; None when none has one."""
    from .data.llava import load_image

    imgs = [load_image(Path(images_root) / s.image, s) for s in samples if s.has_image]
    if not imgs:
        return None
    return image_processor(images=imgs, return_tensors="pt")["pixel_values"]


def generate_answers(model, tokenizer, prompts: Sequence[np.ndarray], pixel_values: torch.Tensor | None, *,
                     max_new_tokens: int, cut_newline: bool = False) -> list[str]:
    """Greedy answers to a batch of tokenised prompts (``kdcache.generation.generate_batch``)."""
    return generate_batch(model, tokenizer, prompts, pixel_values, max_new_tokens=max_new_tokens,
                          temperature=0.0, top_p=1.0, cut_newline=cut_newline)


def _full_batch(items: Sequence[_Item], toks: Sequence[Any], pixel_values, pad_id: int) -> dict:
    """Right-padded teacher-forcing batch of full conversations (``kdcache.data.collate``)."""
    from .data.collate import collate

    rows = [{"sample_id": it.sample.id, "row": it.sample.row, "input_ids": torch.from_numpy(t.input_ids),
             "labels": torch.from_numpy(t.labels), "roles": torch.from_numpy(t.roles), "pixel_values": None}
            for it, t in zip(items, toks)]
    batch = collate(rows, pad_id)
    batch["pixel_values"] = pixel_values  # [n_img, 3, H, W], already loaded for generation
    return batch


class _Agreement:
    """Accumulates top-1 agreement and KL(teacher || student) over reference-answer positions."""

    def __init__(self, source: str):
        self.source = source
        self.top1: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.samples = 0
        self.missing: list[str] = []

    def add(self, student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            tail: torch.Tensor) -> None:
        """student_logits [P, V], topk_ids [P, k], topk_logprobs [P, k], tail [P]."""
        from .losses import topk_divergence

        logits = student_logits.float()
        ids = topk_ids.to(logits.device).long()
        self.top1.append((logits.argmax(-1) == ids[:, 0]).cpu())
        kl = topk_divergence(logits, ids, topk_logprobs.to(logits.device).float(),
                             tail.to(logits.device).float())  # [P]
        self.kl.append(kl.float().cpu())
        self.samples += 1

    def report(self) -> dict[str, Any]:
        top1 = torch.cat(self.top1) if self.top1 else torch.zeros(0, dtype=torch.bool)
        kl = torch.cat(self.kl) if self.kl else torch.zeros(0)
        n = int(top1.numel())
        return {
            "source": self.source,
            "samples": self.samples,
            "positions": n,
            "top1_agreement": float(top1.float().mean()) if n else None,
            "kl": float(kl.mean()) if n else None,
            "missing": self.missing,
        }


def _match_positions(item: _Item, s_roles: np.ndarray, s_ids: np.ndarray, rec) -> tuple[np.ndarray, np.ndarray]:
    """Student positions and teacher-record rows of the reference answer, checked token by token.

    The two sequences may differ in their image-span length (teacher and student processors), so
    positions are matched in order over the last answer, whose target tokens must be identical.
    Returns (student positions int64 [P], record rows int64 [P]).
    """
    sid = item.sample.id
    s_pos = last_answer_positions(s_roles)
    t_roles = rec.roles.cpu().numpy()
    t_ids = rec.input_ids.cpu().numpy()
    t_pos = last_answer_positions(t_roles)
    s_tgt, t_tgt = s_ids[s_pos + 1], t_ids[t_pos + 1]
    if len(s_pos) != len(t_pos) or not np.array_equal(s_tgt, t_tgt):
        raise ValueError(
            f"sample {sid!r} (row {item.sample.row}): the teacher's tokens of the reference answer "
            f"{t_tgt.tolist()} differ from this evaluation's {s_tgt.tolist()}: the teacher (or cache) used "
            "another tokenizer, template or data file. Dump the cache from the same JSON with the same "
            "--template, or pass a teacher sharing the student's tokenizer"
        )
    rec_pos = rec.positions.cpu().numpy().astype(np.int64)
    rows = np.searchsorted(rec_pos, t_pos)
    ok = (rows < len(rec_pos)) & (rec_pos[np.minimum(rows, len(rec_pos) - 1)] == t_pos) if len(rec_pos) else \
        np.zeros(len(t_pos), dtype=bool)
    if not ok.all() or not (rec.kinds.cpu().numpy()[rows] == KIND_RESPONSE).all():
        raise ValueError(
            f"sample {sid!r} (row {item.sample.row}): the teacher record has no response targets at the "
            f"answer positions {t_pos[~ok].tolist() if not ok.all() else t_pos.tolist()}; dump the cache with "
            "--positions including response (e.g. --positions visual,response)"
        )
    return s_pos, rows


def _check_cache(reader, student_vocab: int, num_rows: int, data: str, template: str) -> None:
    attrs = reader.attrs
    kinds = list(attrs["settings"]["positions"])
    if "response" not in kinds:
        raise ValueError(f"cache {reader.path} holds positions {kinds}: agreement needs 'response'; "
                         "re-dump with --positions visual,response")
    tv = int(attrs["teacher"]["vocab_size"])
    if tv != student_vocab:
        raise ValueError(f"cache {reader.path} has teacher vocabulary {tv}, the student's LM head has "
                         f"{student_vocab}: teacher and student must share one vocabulary")
    if int(attrs["dataset"]["num_rows"]) != num_rows:
        raise ValueError(
            f"cache {reader.path} was dumped from {attrs['dataset']['path']} with {attrs['dataset']['num_rows']} "
            f"rows, {data} has {num_rows}: dump the cache from the evaluation JSON itself"
        )
    if attrs["tokenizer"]["template"] != template:
        raise ValueError(f"cache {reader.path} was dumped with template {attrs['tokenizer']['template']!r}, "
                         f"this evaluation uses {template!r}: pass --template {attrs['tokenizer']['template']}")


def _prepare(samples, tok, *, template: str, image_id: int, n_img: int, max_length: int, images: str,
             need_full: bool):
    """Tokenise prompts (and full conversations) and check images -> (items, SkipCounter)."""
    from .data.llava import SampleError, SkipCounter, check_image
    from .data.templates import tokenize_prompt, tokenize_sample

    items, skipped = [], SkipCounter()
    for s in samples:
        try:
            ref, qtype = reference_of(s)
            prompt = tokenize_prompt(s, tok, template=template, image_token_id=image_id, num_image_tokens=n_img)
            if prompt.num_tokens > max_length:
                raise SampleError.of(s, "too_long", f"prompt of {prompt.num_tokens} tokens > max_length {max_length}")
            full = (tokenize_sample(s, tok, template=template, image_token_id=image_id, num_image_tokens=n_img,
                                    max_length=max_length) if need_full else None)
            if s.has_image:
                check_image(Path(images) / s.image, s)
        except SampleError as e:
            skipped.add(e)
            continue
        items.append(_Item(s, ref, qtype, prompt, full))
    return items, skipped


# ----------------------------------------------------------------------------------------------
# the job


@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score ``cfg.model`` on ``cfg.data``; returns the report (also written to ``cfg.out``).

    Report keys: model, data, template, normalisation, num_samples, skipped {reason: n},
    per_type {type: {n, correct, accuracy}}, accuracy_micro (over samples), accuracy_macro (over
    types), agreement (None, or {source, samples, positions, top1_agreement, kl, missing}) and
    predictions [{id, row, type, prediction, reference, correct}]. Averages over nothing are None.
    """
    from tqdm.auto import tqdm

    from .data.collate import all_skipped_error
    from .data.llava import read_llava_json
    from .models import image_token_id, num_image_tokens

    if cfg.teacher_cache is not None and cfg.teacher is not None:
        raise ValueError("give at most one of teacher_cache and teacher")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {cfg.batch_size}, {cfg.max_new_tokens}")
    if cfg.teacher_cache is not None:
        from .cache.store import cache_location

        teacher_cache = cache_location(cfg.teacher_cache, cfg.storage_options, what="teacher_cache")  # before the model loads
    device = _device()
    model, processor = _load(cfg.model, device)
    tok = processor.tokenizer
    image_id, n_img = image_token_id(model.config), num_image_tokens(model.config, processor)
    all_samples = read_llava_json(cfg.data)
    samples = all_samples[: cfg.limit] if cfg.limit is not None else all_samples
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    V = int(model.lm_head.weight.shape[0])

    agree = reader = teacher = None
    if cfg.teacher_cache is not None:
        from .cache.reader import CacheReader

        reader = CacheReader(teacher_cache)
        _check_cache(reader, V, len(all_samples), cfg.data, cfg.template)
        agree = _Agreement(f"cache:{cfg.teacher_cache}")
    elif cfg.teacher is not None:
        teacher, t_proc = _load(cfg.teacher, device, "--teacher")
        if int(teacher.lm_head.weight.shape[0]) != V:
            raise ValueError(f"teacher {cfg.teacher} has vocabulary {teacher.lm_head.weight.shape[0]}, the student "
                             f"{V}: they must share one vocabulary")
        t_image_id, t_n_img = image_token_id(teacher.config), num_image_tokens(teacher.config, t_proc)
        agree = _Agreement(f"teacher:{cfg.teacher}")

    items, skipped = _prepare(samples, tok, template=cfg.template, image_id=image_id, n_img=n_img,
                              max_length=cfg.max_length, images=cfg.images, need_full=agree is not None)
    if not items and skipped.total:
        raise all_skipped_error(skipped, cfg.data, cfg.images, "eval", "nothing was scored")
    if skipped.total:
        skipped.report()

    predictions: list[str] = []
    # closed on an error too, before it is printed (the error is the last line)
    with tqdm(total=len(items), desc="eval", unit="sample", dynamic_ncols=True) as bar:
        for s0 in range(0, len(items), cfg.batch_size):
            chunk = items[s0:s0 + cfg.batch_size]
            pix = _pixels([it.sample for it in chunk], processor.image_processor, cfg.images)
            predictions += generate_answers(model, tok, [it.prompt.input_ids for it in chunk], pix,
                                            max_new_tokens=cfg.max_new_tokens, cut_newline=cfg.template == "pretrain")
            if agree is not None:
                _agreement_batch(agree, model, chunk, pix, pad, reader=reader, teacher=teacher,
                                 teacher_inputs=None if teacher is None else (t_proc, t_image_id, t_n_img),
                                 cfg=cfg)
            bar.update(len(chunk))

    sc = score(predictions, [it.reference for it in items], [it.qtype for it in items])
    report = {
        "model": cfg.model,
        "data": cfg.data,
        "template": cfg.template,
        "normalisation": NORMALISATION,
        "num_samples": sc["n"],
        "skipped": dict(skipped.counts),
        "per_type": sc["per_type"],
        "accuracy_micro": _finite_or_none(sc["micro"]),  # None (JSON null) when nothing was scored
        "accuracy_macro": _finite_or_none(sc["macro"]),
        "agreement": agree.report() if agree is not None else None,
        "predictions": [
            {"id": it.sample.id, "row": it.sample.row, "type": it.qtype, "prediction": p, "reference": it.reference,
             "correct": ok}
            for it, p, ok in zip(items, predictions, sc["correct"])
        ],
    }
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _agreement_batch(agree: _Agreement, model, chunk: Sequence[_Item], pix, pad: int, *, reader, teacher,
                     teacher_inputs, cfg: EvalConfig) -> None:
    """Teacher-forced student pass over the full conversations of ``chunk`` + teacher targets."""
    device = model.device
    batch = _full_batch(chunk, [it.full for it in chunk], pix, pad)
    if teacher is not None:
        from .data.templates import tokenize_sample
        from .teacher import teacher_records

        t_proc, t_image_id, t_n_img = teacher_inputs
        t_toks = [tokenize_sample(it.sample, t_proc.tokenizer, template=cfg.template, image_token_id=t_image_id,
                                  num_image_tokens=t_n_img, max_length=None) for it in chunk]
        t_pix = _pixels([it.sample for it in chunk], t_proc.image_processor, cfg.images)
        t_batch = _full_batch(chunk, t_toks, t_pix, pad)
        V_t = int(teacher.lm_head.weight.shape[0])
        records = teacher_records(teacher, t_batch, kinds=("response",), top_k=V_t, with_hidden=False)
    else:
        records = []
        for it in chunk:
            try:
                records.append(reader.get_by_row(it.sample.row))
            except KeyError:  # the dump skipped it (e.g. too long): no target, reported as missing
                records.append(None)
    pixels = batch["pixel_values"]
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=model.dtype)
    hidden = model.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         pixel_values=pixels, use_cache=False).last_hidden_state  # [B, T, D]
    n_img_t = int(reader.attrs["teacher"]["num_image_tokens"]) if reader is not None else 0
    for b, (it, rec) in enumerate(zip(chunk, records)):
        if rec is not None and teacher is None:
            # the teacher's untruncated length: this sequence with the cache's image-span length
            n_vis = int((it.full.roles == ROLE_VISUAL).sum())
            if rec.num_tokens < it.full.num_tokens - n_vis + (n_img_t if n_vis else 0):
                rec = None  # a dump with --on-too-long truncate cut it: its last answer may be gone
        if rec is None:
            agree.missing.append(it.sample.id)
            continue
        if rec.sample_id != it.sample.id:
            raise ValueError(f"row {it.sample.row}: the cache holds sample {rec.sample_id!r}, the JSON "
                             f"{it.sample.id!r}: the cache was dumped from another file")
        s_pos, rows = _match_positions(it, it.full.roles, it.full.input_ids, rec)
        logits = model.lm_head(hidden[b, torch.from_numpy(s_pos).to(device)])  # [P, V]
        r = torch.from_numpy(rows).to(rec.topk_ids.device)  # record rows of those positions
        agree.add(logits, rec.topk_ids[r], rec.topk_logprobs[r], rec.tail_logmass[r])


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict[str, Any]) -> str:
    """Aligned text table: type | n | accuracy, then the averages and the agreement line."""
    rows = [(t, str(v["n"]), _pct(v["accuracy"])) for t, v in report["per_type"].items()]
    rows.append(("micro (samples)", str(report["num_samples"]), _pct(report["accuracy_micro"])))
    rows.append(("macro (types)", str(len(report["per_type"])), _pct(report["accuracy_macro"])))
    head = ("type", "n", "accuracy")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}"  # noqa: E731
    out = [line(head), "  ".join("-" * x for x in w)]
    out += [line(r) for r in rows[:-2]]
    out.append("  ".join("-" * x for x in w))
    out += [line(r) for r in rows[-2:]]
    if report["skipped"]:
        out.append("skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(report["skipped"].items())))
    a = report["agreement"]
    if a is not None:
        kl = "-" if a["kl"] is None else f"{a['kl']:.4f}"
        out.append(f"agreement with {a['source']}: top-1 {_pct(a['top1_agreement'])}, "
                   f"KL(teacher||student) {kl} over {a['positions']} answer positions "
                   f"of {a['samples']} samples" + (f" ({len(a['missing'])} not in the cache or cut short there)" if a["missing"] else ""))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# smoke test


@torch.no_grad()
def forward_smoke(model: str, data: str, images: str, *, batch_size: int = 4, template: str = "chat") -> list[str]:
    """One forward pass with labels on the first ``batch_size`` usable samples -> printable lines:
    input_ids / pixel_values / logits shapes, the loss, and visual tokens per image (the config's
    count and the count found in the batch, which must agree)."""
    from .data.collate import LlavaTorchDataset, collate
    from .data.llava import read_llava_json
    from .models import image_token_id, num_image_tokens

    device = _device()
    m, processor = _load(model, device)
    tok = processor.tokenizer
    image_id, n_img = image_token_id(m.config), num_image_tokens(m.config, processor)
    samples = read_llava_json(data)[:batch_size]
    ds = LlavaTorchDataset(samples, tok, processor.image_processor, images, template=template,
                           image_token_id=image_id, num_image_tokens=n_img, max_length=None)
    if len(ds) == 0:
        raise ValueError(f"none of the first {batch_size} samples of {data} is usable ({ds.skipped.summary()})")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate([ds[i] for i in range(len(ds))], pad)
    pix = batch["pixel_values"]
    out = m(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            pixel_values=None if pix is None else pix.to(device=device, dtype=m.dtype),
            labels=batch["labels"].to(device), use_cache=False)
    per_image = (batch["input_ids"][batch["has_image"]] == image_id).sum(1).tolist()
    if any(n != n_img for n in per_image):
        raise ValueError(f"image spans of {per_image} tokens in the batch, the model expects {n_img}")
    return [
        f"model: {model} ({sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, {m.dtype}, {device})",
        f"samples: {len(ds)} of the first {batch_size}" + (f" ({ds.skipped.summary()})" if ds.skipped.total else ""),
        f"input_ids: {tuple(batch['input_ids'].shape)}",
        f"pixel_values: {tuple(pix.shape) if pix is not None else None}",
        f"logits: {tuple(out.logits.shape)}",
        f"loss: {out.loss.item():.4f}",
        f"visual tokens per image: {n_img} (in the batch: {per_image})",
    ]


__all__ = [
    "ALL_TYPES", "NORMALISATION", "NUMBER_WORDS", "evaluate", "format_report", "forward_smoke",
    "generate_answers", "last_answer_positions", "left_pad", "normalize_answer", "reference_of", "score",
    "stop_token_ids",
]
