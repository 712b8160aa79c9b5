"""A synthetic LLaVA-format dataset with checkable answers, and a tokenizer trained on it.

Images are small PNGs of 1..max_objects coloured shapes on a 3x3 grid, every object with its own
colour *and* shape so each question has one answer:

    colour    "What colour is the circle?"           -> "red"
    shape     "What shape is the red object?"        -> "circle"
    count     "How many objects are there?"          -> "2"
    position  "Where is the red circle?"             -> "top left"
    yesno     "Is there a blue square?"              -> "yes" | "no"

Files (all LLaVA JSON, image paths relative to ``images/``):
- ``captions.json``  one caption sample per training image (PT / DPT)
- ``instruct.json``  one multi-turn conversation of ``qa_per_image`` questions per training
                     image (SFT / DFT), plus ``num_text_only`` text-only arithmetic samples
- ``val.json``, ``eval.json``  held-out images, single-turn, extra keys ``question_type`` and
                     ``answer``; question types cycle so each type is equally represented
- ``*_small.json``   the same restricted to the first ``student_images`` training images
- ``tokenizer/``     byte-level BPE (tokenizers) saved as a transformers fast tokenizer with
                     ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ``<image>``
                     and a Qwen2.5-style ChatML chat template

Same arguments -> byte-identical files (python's ``random.Random(seed)`` drives everything).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kdcache.data.llava import read_llava_json, sample_to_json
from kdcache.data.templates import QWEN2_BASE_SYSTEM

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
CELLS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
QUESTION_TYPES = ("colour", "shape", "count", "position", "yesno")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
DEFAULT_SYSTEM = "You are a helpful assistant."
MANIFEST = "synthetic.json"  # written last by make_synthetic: its arguments and the files it wrote

# Qwen2.5-style ChatML: a default system turn when none is given; generation prompt on request.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in the image?",
    "Give a short caption.",
    "Write a short description of the picture.",
)


# ----------------------------------------------------------------------------------------------
# scenes and drawing


def _scene(rng: random.Random, max_objects: int) -> list[dict[str, str]]:
    n = rng.randint(1, max_objects)
    colours = rng.sample(sorted(COLOURS), n)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(CELLS, n)
    return [{"colour": c, "shape": s, "position": p} for c, s, p in zip(colours, shapes, cells)]


def _draw(scene: list[dict[str, str]], size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    cell = size / 3.0
    r = cell * 0.38  # half-size of a shape; leaves a margin inside its cell
    for obj in scene:
        k = CELLS.index(obj["position"])
        cx, cy = (k % 3 + 0.5) * cell, (k // 3 + 0.5) * cell
        col = COLOURS[obj["colour"]]
        shape = obj["shape"]
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=col)
        elif shape == "diamond":
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
        else:  # cross
            w = r * 0.35
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
    return im


# ----------------------------------------------------------------------------------------------
# text


def _describe(obj: dict[str, str]) -> str:
    where = "in the center" if obj["position"] == "center" else f"at the {obj['position']}"
    return f"a {obj['colour']} {obj['shape']} {where}"


def _caption(scene: list[dict[str, str]]) -> str:
    parts = [_describe(o) for o in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _question(rng: random.Random, scene: list[dict[str, str]], qtype: str) -> tuple[str, str]:
    obj = rng.choice(scene)
    if qtype == "colour":
        return f"What colour is the {obj['shape']}?", obj["colour"]
    if qtype == "shape":
        return f"What shape is the {obj['colour']} object?", obj["shape"]
    if qtype == "count":
        return "How many objects are there?", str(len(scene))
    if qtype == "position":
        return f"Where is the {obj['colour']} {obj['shape']}?", obj["position"]
    if qtype == "yesno":
        if rng.random() < 0.5:
            return f"Is there a {obj['colour']} {obj['shape']}?", "yes"
        present = {(o["colour"], o["shape"]) for o in scene}
        absent = [(c, s) for c in sorted(COLOURS) for s in SHAPES if (c, s) not in present]
        c, s = rng.choice(absent)
        return f"Is there a {c} {s}?", "no"
    raise ValueError(f"unknown question type {qtype!r}: choose from {QUESTION_TYPES}")


def _with_image(rng: random.Random, text: str) -> str:
    # LLaVA data has the placeholder both before and after the text; exercise both.
    return "<image>\n" + text if rng.random() < 0.8 else text + "\n<image>"


def _text_only(rng: random.Random, i: int) -> dict[str, Any]:
    a, b = rng.randint(0, 5), rng.randint(0, 4)
    if rng.random() < 0.5:
        q, ans = f"What is {a} plus {b}?", str(a + b)
    else:
        q, ans = f"Write the number {a} as a word.", NUMBER_WORDS[a]
    return {"id": f"text-{i:06d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]}


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], out_dir: str | os.PathLike, *, vocab_size: int = 768):
    """Train a byte-level BPE on ``texts`` and save it as a transformers fast tokenizer.

    Special tokens get ids 0..3 in SPECIAL_TOKENS order. eos = <|im_end|> and pad = <|endoftext|>
    as in Qwen2.5-Instruct, so template 'chat' ends turns with eos and 'qwen2_base' with pad.
    Returns the loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


# ----------------------------------------------------------------------------------------------
# the dataset


def _dump(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def _texts(samples: list[dict[str, Any]]) -> list[str]:
    return [t["value"].replace("<image>", "") for s in samples for t in s["conversations"]]


def make_synthetic(
    out_dir: str | os.PathLike,
    *,
    num_images: int,
    qa_per_image: int,
    num_val: int,
    num_eval: int,
    seed: int,
    image_size: int = 64,
    max_objects: int = 2,
    num_text_only: int = 0,
    student_images: int | None = None,
    vocab_size: int = 768,
) -> dict[str, Path]:
    """Write the synthetic dataset under ``out_dir``; returns the paths of what it wrote.

    num_images training images (captions + instruct), num_val / num_eval held-out images with one
    single-turn question each. Keys of the result: root, images_root, captions, instruct, val, eval,
    tokenizer, and captions_small / instruct_small when ``student_images`` is given.
    """
    if not 1 <= max_objects <= min(len(SHAPES), len(COLOURS)):
        raise ValueError(f"max_objects must be in 1..{min(len(SHAPES), len(COLOURS))}, got {max_objects}")
    if student_images is not None and not 0 < student_images <= num_images:
        raise ValueError(f"student_images must be in 1..num_images ({num_images}), got {student_images}")
    root = Path(out_dir)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def image(name: str) -> tuple[str, list[dict[str, str]]]:
        scene = _scene(rng, max_objects)
        # compress_level=1: ~3x faster than the default and PNGs are tiny anyway
        _draw(scene, image_size).save(img_dir / name, format="PNG", compress_level=1)
        return name, scene

    captions, instruct = [], []
    for i in range(num_images):
        name, scene = image(f"train_{i:06d}.png")
        sid = f"syn-{i:06d}"
        captions.append(
            {
                "id": f"cap-{i:06d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": _with_image(rng, rng.choice(_CAPTION_PROMPTS))},
                    {"from": "gpt", "value": _caption(scene)},
                ],
            }
        )
        convs = []
        for j in range(qa_per_image):
            q, a = _question(rng, scene, rng.choice(QUESTION_TYPES))
            convs += [{"from": "human", "value": _with_image(rng, q) if j == 0 else q}, {"from": "gpt", "value": a}]
        instruct.append({"id": sid, "image": name, "conversations": convs})
    text_only = [_text_only(rng, i) for i in range(num_text_only)]
    if text_only:
        # interleave deterministically so text-only samples are spread over the epoch
        step = max(1, len(instruct) // len(text_only))
        for k, s in enumerate(text_only):
            instruct.insert(min(len(instruct), (k + 1) * step + k), s)

    def heldout(split: str, n: int) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            name, scene = image(f"{split}_{i:06d}.png")
            qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
            q, a = _question(rng, scene, qtype)
            out.append(
                {
                    "id": f"{split}-{i:06d}",
                    "image": name,
                    "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
                    "question_type": qtype,
                    "answer": a,
                }
            )
        return out

    val, evals = heldout("val", num_val), heldout("eval", num_eval)

    paths = {"root": root, "images_root": img_dir}
    for key, data in (("captions", captions), ("instruct", instruct), ("val", val), ("eval", evals)):
        paths[key] = root / f"{key}.json"
        _dump(data, paths[key])
    if student_images is not None:
        keep = {f"train_{i:06d}.png" for i in range(student_images)}
        for key, data in (("captions", captions), ("instruct", instruct)):
            paths[f"{key}_small"] = root / f"{key}_small.json"
            _dump([s for s in data if s.get("image") in keep or "image" not in s], paths[f"{key}_small"])

    # Template words are in the corpus so both templates tokenise compactly.
    corpus = _texts(captions) + _texts(instruct) + _texts(val) + _texts(evals)
    corpus += [DEFAULT_SYSTEM, "system\n", "user\n", "assistant\n", QWEN2_BASE_SYSTEM + " USER: ASSISTANT: "]
    paths["tokenizer"] = root / "tokenizer"
    train_tokenizer(corpus, paths["tokenizer"], vocab_size=vocab_size)
    # Written last: what the directory holds and how it was made (a recipe's make-data step is
    # done only when this equals its settings and every file listed exists).
    manifest = {"args": dict(num_images=num_images, qa_per_image=qa_per_image, num_val=num_val, num_eval=num_eval,
                             seed=seed, image_size=image_size, max_objects=max_objects,
                             num_text_only=num_text_only, student_images=student_images, vocab_size=vocab_size),
                "files": {k: str(v.relative_to(root)) for k, v in paths.items() if k != "root"}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """``{args, files}`` of the synthetic data at ``out_dir`` (``make_synthetic``), or None."""
    f = Path(out_dir) / MANIFEST
    try:
        return json.loads(f.read_text())
    except (FileNotFoundError, ValueError):
        return None


def make_split_subset(
    json_path: str | os.PathLike, out_path: str | os.PathLike, *, num_images: int, seed: int | None = None
) -> Path:
    """Keep the samples of ``num_images`` distinct images (first ones, or a seeded random choice).

    Text-only samples are kept. For training a student on a subset of the teacher's images.
    """
    samples = read_llava_json(json_path)
    images = list(dict.fromkeys(s.image for s in samples if s.image is not None))
    if num_images > len(images):
        raise ValueError(f"{json_path} has {len(images)} distinct images, asked for {num_images}")
    chosen = set(images[:num_images] if seed is None else random.Random(seed).sample(images, num_images))
    out = [sample_to_json(s) for s in samples if s.image is None or s.image in chosen]
    _dump(out, Path(out_path))
    return Path(out_path)
