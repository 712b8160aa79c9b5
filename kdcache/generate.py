"""Teacher-generated data: rewrite a LLaVA JSON's assistant turns with the teacher's own answers.

    kdcache generate --teacher runs/teacher-sft --data data/instruct.json --images data \\
        --out data/instruct_teacher.json --max-new-tokens 256            # greedy (HF)
    kdcache generate ... --temperature 0.7 --top-p 0.9 --seed 0           # sampled
    kdcache generate ... --backend vllm                                   # pip install 'kdcache[vllm]'

Sequence-level distillation data (the student then learns the teacher's own outputs): turn by
turn, answer i is generated from the prompt of human turn i with the teacher's *earlier answers*
in the history (not the dataset's). Ids, images, human turns, the number of turns and every extra
key are kept; the output is LLaVA JSON (``kdcache.data.llava.read_llava_json`` reads it).

``--temperature`` here is the *sampling* temperature of generation (0 = greedy), not the KD
temperature of ``kdcache train`` nor the dump's softmax temperature.

Resumable: finished samples are appended to ``OUT.partial.jsonl`` (a header line with the
settings and the data file's sha256, then one JSON line per sample, a whole batch per write);
a rerun with the same settings skips the batches already there and regenerates any batch that
is incomplete (so a resumed run gives what an uninterrupted one gives: batches are fixed by row,
and sampling is seeded per batch and turn); other settings are refused naming the key. The final
JSON is written to a temporary file and renamed. The sidecar is kept, so a rerun only rewrites
the same JSON.

Samples that cannot be used (missing image, prompt longer than ``max_length``, ...) are left out
of the output and counted per reason. An empty answer (the teacher stopped at once) is kept as
"" and counted: train/dump will skip such a sample as ``empty_response``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import VLLM_GPU_MEMORY_ALONE, VllmConfig

_DEFAULT_VLLM = VllmConfig()  # frozen: safe to share as a default

from .generation import generate_batch

SIDE_SUFFIX = ".partial.jsonl"


class GenerateError(RuntimeError):
    """Generation cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class GenerateSettings:
    """What changes the generated answers: a resumed run must have the same (checked)."""

    teacher: str
    data_sha256: str
    template: str
    max_new_tokens: int
    temperature: float  # sampling temperature (0: greedy)
    top_p: float
    seed: int
    batch_size: int
    max_length: int
    backend: str


def sidecar_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + SIDE_SUFFIX)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sidecar(path: Path, settings: GenerateSettings) -> dict[int, dict]:
    """{row: line} of the finished samples in ``path``, after checking its header against
    ``settings``; a torn last line (crash mid-write) is cut off the file; later lines win."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        # A crash mid-write left a torn last line: cut it off so that appends start on a new line
        # (its batch is incomplete, hence redone).
        text = text[:text.rfind("\n") + 1]
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(text.encode("utf-8")))
    # split on "\n" only: answers may hold other line separators (U+2028, ...) that JSON keeps raw
    lines = text.split("\n")[:-1] if text else []
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GenerateError(f"{path} is not a kdcache generate sidecar ({e}): delete it or choose another --out") from e
    want = asdict(settings)
    diffs = [f"{k}: {header.get(k)!r} there, {v!r} now" for k, v in want.items() if header.get(k) != v]
    if diffs:
        raise GenerateError(f"{path} was started with other settings ({'; '.join(diffs)}): rerun with those "
                            f"settings, or delete {path} (and {path.name[:-len(SIDE_SUFFIX)]}) to start over")
    done: dict[int, dict] = {}
    for i, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise GenerateError(f"{path}: line {i} is not JSON: delete the file to start over") from None
        done[int(rec["row"])] = rec
    return done





class _HfGenerator:
    def __init__(self, teacher: str, st: GenerateSettings):
        from .models import default_dtype, load_model

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        dtype = default_dtype(device)
        self.model, self.processor = load_model(teacher, dtype=dtype, device=device, flag="--teacher")
        self.model.requires_grad_(False).eval()
        self.st = st

    def answers(self, prompts, images, seed: int) -> list[str]:
        torch.manual_seed(seed)  # sampling: one stream per (batch, turn), so a resumed run repeats it
        imgs = [im for im in images if im is not None]
        pix = self.processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"] if imgs else None
        return generate_batch(self.model, self.processor.tokenizer, prompts, pix,
                              max_new_tokens=self.st.max_new_tokens, temperature=self.st.temperature,
                              top_p=self.st.top_p, cut_newline=self.st.template == "pretrain")


class _VllmGenerator:
    """The same through vLLM's offline engine (token-id prompts, one image each)."""

    def __init__(self, teacher: str, st: GenerateSettings, tokenizer, engine: VllmConfig):
        from .backends.vllm import import_vllm
        from .generation import stop_token_ids

        LLM, self._SamplingParams = import_vllm()
        mem = VLLM_GPU_MEMORY_ALONE if engine.gpu_memory_utilization is None else engine.gpu_memory_utilization
        extra = {} if engine.max_model_len is None else {"max_model_len": engine.max_model_len}
        self.llm = LLM(model=str(teacher), tensor_parallel_size=engine.tensor_parallel_size, dtype=engine.dtype,
                       max_num_batched_tokens=engine.max_num_batched_tokens, gpu_memory_utilization=mem,
                       limit_mm_per_prompt={"image": 1}, **extra)
        self.tokenizer = tokenizer
        self.stops = stop_token_ids(tokenizer)
        self.st = st

    def answers(self, prompts, images, seed: int) -> list[str]:
        st = self.st
        params = self._SamplingParams(temperature=st.temperature, top_p=st.top_p, seed=seed,
                                      max_tokens=st.max_new_tokens, stop_token_ids=self.stops,
                                      skip_special_tokens=True)
        reqs = []
        for ids, im in zip(prompts, images):
            r: dict[str, Any] = {"prompt_token_ids": [int(i) for i in ids]}
            if im is not None:
                r["multi_modal_data"] = {"image": im}
            reqs.append(r)
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        if st.template == "pretrain":
            texts = [t.split("\n", 1)[0] for t in texts]
        return [t.strip() for t in texts]


def _prompt_for(sample, answers: list[str], turn: int, tok, *, template: str, image_id: int, n_img: int):
    """Tokenised prompt of human turn ``turn`` with the teacher's earlier ``answers`` as history."""
    from .data.llava import ROLE_ASSISTANT, LlavaSample
    from .data.templates import tokenize_prompt

    turns = []
    for i in range(turn):
        turns += [sample.turns[2 * i], (ROLE_ASSISTANT, answers[i])]
    turns.append(sample.turns[2 * turn])
    probe = LlavaSample(sample.id, sample.row, sample.image, turns, sample.extra, sample.source)
    return tokenize_prompt(probe, tok, template=template, image_token_id=image_id, num_image_tokens=n_img)


def _generate_chunk(gen, chunk, tok, *, st: GenerateSettings, image_id: int, n_img: int, chunk_index: int,
                    images_root: str) -> list[dict]:
    """Answers for every turn of every sample in ``chunk`` -> sidecar lines (row order)."""
    from .data.llava import ROLE_ASSISTANT, SampleError, load_image

    n_turns = {s.row: sum(1 for r, _ in s.turns if r == ROLE_ASSISTANT) for s in chunk}
    answers: dict[int, list[str]] = {s.row: [] for s in chunk}
    failed: dict[int, str] = {}
    images: dict[int, Any] = {}
    for s in chunk:
        try:
            images[s.row] = load_image(Path(images_root) / s.image, s) if s.has_image else None
        except SampleError as e:
            failed[s.row] = e.reason
            print(f"generate: skipping {e}", file=sys.stderr)
    for turn in range(max(n_turns.values(), default=0)):
        active, prompts = [], []
        for s in chunk:
            if s.row in failed or turn >= n_turns[s.row]:
                continue
            try:
                p = _prompt_for(s, answers[s.row], turn, tok, template=st.template, image_id=image_id, n_img=n_img)
                if p.num_tokens + st.max_new_tokens > st.max_length:
                    raise SampleError.of(s, "too_long", f"turn {turn}: prompt of {p.num_tokens} tokens + "
                                                        f"{st.max_new_tokens} new > max_length {st.max_length}")
            except SampleError as e:
                failed[s.row] = e.reason
                print(f"generate: skipping {e}", file=sys.stderr)
                continue
            active.append(s)
            prompts.append(p.input_ids)
        if not active:
            continue
        seed = (st.seed * 1_000_003 + chunk_index) * 1009 + turn
        for s, a in zip(active, gen.answers(prompts, [images[s.row] for s in active], seed)):
            answers[s.row].append(a)
    lines = []
    for s in chunk:
        if s.row in failed:
            lines.append({"row": s.row, "id": s.id, "skipped": failed[s.row]})
        else:
            lines.append({"row": s.row, "id": s.id, "answers": answers[s.row]})
    return lines


def _with_answers(sample, answers: list[str]) -> dict:
    """The sample's JSON object with its gpt turns replaced, everything else kept."""
    from .data.llava import ROLE_ASSISTANT, LlavaSample, sample_to_json

    it = iter(answers)
    turns = [(r, next(it) if r == ROLE_ASSISTANT else t) for r, t in sample.turns]
    return sample_to_json(LlavaSample(sample.id, sample.row, sample.image, turns, sample.extra, sample.source))


def generate_dataset(teacher: str, data: str, images: str, out: str, *, max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, backend: str = "hf",
                     template: str = "chat", batch_size: int = 8, max_length: int = 2048,
                     vllm: VllmConfig = _DEFAULT_VLLM) -> dict[str, Any]:
    """Write ``out``: ``data`` with every assistant turn replaced by the teacher's answer.

    ``vllm``: the engine settings with ``backend="vllm"`` (tensor parallelism, dtype, tokens per
    step, memory share: alone on the GPU, 0.9 unless set; context length); not part of the
    resume settings, since they do not change what is generated.

    Returns {out, samples, skipped {reason: n}, empty_answers, generated_now}. See the module
    docstring for the resume and seeding rules.
    """
    from tqdm.auto import tqdm

    from .backends import BACKENDS
    from .data.llava import DataError, read_llava_json
    from .data.templates import TEMPLATES
    from .models import image_token_id, model_dir, num_image_tokens

    if backend not in BACKENDS:
        raise GenerateError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if template not in TEMPLATES:
        raise GenerateError(f"unknown template {template!r}: choose from {', '.join(TEMPLATES)}")
    if max_new_tokens < 1 or batch_size < 1:
        raise GenerateError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerateError(f"sampling temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    try:
        samples = read_llava_json(data)
    except (DataError, FileNotFoundError) as e:
        raise GenerateError(f"cannot read the data file {data}: {e}") from e
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    st = GenerateSettings(teacher=str(teacher), data_sha256=_sha256(data), template=template,
                          max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                          seed=int(seed), batch_size=int(batch_size), max_length=int(max_length), backend=backend)
    side = sidecar_path(out_p)
    done = read_sidecar(side, st)
    if not side.is_file() or side.stat().st_size == 0:
        side.write_text(json.dumps({"settings": asdict(st)}) + "\n", encoding="utf-8")

    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    todo = [(ci, c) for ci, c in enumerate(chunks) if not all(s.row in done for s in c)]
    generated = 0
    if todo:
        if backend == "vllm":
            from transformers import AutoConfig, AutoProcessor

            path = model_dir(teacher, "--teacher")  # config + processor only: vLLM loads the weights
            config, processor = AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path)
            gen = _VllmGenerator(teacher, st, processor.tokenizer, vllm)
        else:
            gen = _HfGenerator(teacher, st)
            processor, config = gen.processor, gen.model.config
        tok = processor.tokenizer
        image_id, n_img = image_token_id(config), num_image_tokens(config, processor)
        bar = tqdm(total=len(samples), initial=len(samples) - sum(len(c) for _, c in todo), desc="generate",
                   unit="sample", dynamic_ncols=True, file=sys.stderr)
        with bar, open(side, "a", encoding="utf-8") as f:  # the bar closes on an error too, before it prints
            for ci, chunk in todo:
                lines = _generate_chunk(gen, chunk, tok, st=st, image_id=image_id, n_img=n_img, chunk_index=ci,
                                        images_root=images)
                # One write per batch, flushed: a crash leaves whole batches (or a torn last line).
                f.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in lines))
                f.flush()
                for rec in lines:
                    done[rec["row"]] = rec
                generated += len(chunk)
                bar.update(len(chunk))

    objs, skipped, empty = [], {}, 0
    for s in samples:
        rec = done[s.row]
        if rec["id"] != s.id:
            raise GenerateError(f"{side}: row {s.row} holds sample {rec['id']!r}, the data file {s.id!r}: "
                                f"delete {side} to start over")
        if "skipped" in rec:
            skipped[rec["skipped"]] = skipped.get(rec["skipped"], 0) + 1
            continue
        empty += sum(1 for a in rec["answers"] if not a)
        objs.append(_with_answers(s, rec["answers"]))
    tmp = out_p.with_name(out_p.name + ".tmp")
    tmp.write_text(json.dumps(objs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_p)
    return {"out": str(out_p), "samples": len(objs), "skipped": skipped, "empty_answers": empty,
            "generated_now": generated}


__all__ = ["GenerateError", "GenerateSettings", "generate_batch", "generate_dataset", "read_sidecar", "sidecar_path"]
