"""Reading LLaVA JSON (LLaVA-558k captions, LLaVA-mix-665k, our synthetic and eval splits).

A file is a JSON list of samples::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A bus."}, ...]}

``image`` is optional (text-only samples); ``<image>`` sits in the first human turn, before or
after the text. Any other keys (``question_type``, ``answer`` in our eval splits) are kept in
``LlavaSample.extra``.

Two kinds of failure:
- ``DataError``: the file itself is malformed (not a list, a sample without conversations, roles
  that do not alternate human/gpt). Nothing sensible can be trained from it; always raised.
- ``SampleError``: one sample cannot be used (its image is missing, it has no answer, it is too
  long...). Callers either skip it and count it in a ``SkipCounter`` or raise, by flag.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, UnidentifiedImageError

from kdcache.cache.format import REASON_CODES  # reason -> the uint8 code index/status stores

IMAGE_TOKEN = "<image>"

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"
# LLaVA writes human/gpt; some converted sets write user/assistant. Both mean the same.
_ROLE_ALIASES = {"human": ROLE_USER, "user": ROLE_USER, "gpt": ROLE_ASSISTANT, "assistant": ROLE_ASSISTANT}

SKIP_REASONS = tuple(REASON_CODES)  # missing_image, corrupt_image, ..., too_long, other: the cache's codes are their home

_FIXES = {
    "missing_image": "check --images (the directory image paths are relative to) and the sample's 'image' path, or drop the sample",
    "corrupt_image": "re-download or re-encode the image file (keep the JSON as it is to resume a dump or a "
                     "training run), or drop the sample",
    "no_image_token": "put exactly one '<image>' in the first human turn (e.g. '<image>\\n' + question)",
    "repeated_image_token": "keep a single '<image>' in the first human turn; multi-image samples are not supported",
    "no_response": "add a 'gpt' turn answering the last 'human' turn, or drop the sample",
    "empty_response": "give the 'gpt' turn a non-empty 'value', or drop the sample",
    "too_long": "raise max_length, use on_too_long='truncate', or drop the sample",
    "other": "fix the sample as described, or drop it",
}


def fix_for(reason: str) -> str:
    """The advice for skip reason ``reason`` (one of ``SKIP_REASONS``)."""
    return _FIXES[reason]


class DataError(Exception):
    """The LLaVA JSON file is structurally invalid (never skipped)."""


class SampleError(Exception):
    """One sample cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, sample_id: str, row: int, reason: str, detail: str, source: str | None = None):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown SampleError reason {reason!r}: choose from {SKIP_REASONS}")
        self.sample_id = sample_id
        self.row = row
        self.reason = reason
        self.detail = detail
        self.source = source
        where = f"row {row} of {source}" if source else f"row {row}"
        super().__init__(f"sample {sample_id!r} ({where}): {reason}: {detail}. Fix: {_FIXES[reason]}")

    def __reduce__(self):  # picklable with its fields (it crosses from prepare's worker processes)
        return (type(self), (self.sample_id, self.row, self.reason, self.detail, self.source))

    @classmethod
    def of(cls, sample: "LlavaSample", reason: str, detail: str) -> "SampleError":
        return cls(sample.id, sample.row, reason, detail, sample.source)


@dataclass
class LlavaSample:
    id: str
    row: int  # index of the sample in its JSON list: with the id, the key the cache stores
    image: str | None  # path relative to the images root, None for text-only samples
    turns: list[tuple[str, str]]  # (ROLE_USER | ROLE_ASSISTANT, text), alternating, user first
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the JSON object
    source: str | None = None  # the JSON file it came from, for error messages

    @property
    def has_image(self) -> bool:
        return self.image is not None


def parse_llava(data: Any, source: str = "<memory>") -> list[LlavaSample]:
    """Validate and convert an already-loaded LLaVA JSON list; raises DataError on structure."""
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of samples, got {type(data).__name__}")
    samples: list[LlavaSample] = []
    for row, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{source}: row {row} is a {type(obj).__name__}, expected an object")
        sid = obj.get("id")
        if sid is None:
            raise DataError(f"{source}: row {row} has no 'id'; every sample needs one (the cache keys on it)")
        # bool is an int subclass, and str() of a >4300-digit int raises ValueError: refuse both here
        if isinstance(sid, bool) or not isinstance(sid, (str, int)) or (isinstance(sid, int) and abs(sid) >= 10**64):
            raise DataError(f"{source}: row {row} has 'id' of type {type(sid).__name__}; use a string "
                            "(or an integer below 10**64)")
        sid = str(sid)
        _check_text(sid, f"{source}: row {row} 'id'")
        if not sid or "\x00" in sid:
            raise DataError(f"{source}: row {row} has an empty 'id' or one with a NUL character; give it a "
                            "non-empty printable id")
        where = f"{source}: row {row} (id {sid!r})"
        convs = obj.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise DataError(f"{where}: 'conversations' is missing or not a non-empty list")
        turns: list[tuple[str, str]] = []
        for j, turn in enumerate(convs):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: turn {j} must be an object with 'from' and 'value'")
            role = _ROLE_ALIASES.get(turn["from"]) if isinstance(turn["from"], str) else None
            if role is None:
                raise DataError(f"{where}: turn {j} has from={turn['from']!r}; expected 'human' or 'gpt'")
            expected = ROLE_USER if j % 2 == 0 else ROLE_ASSISTANT
            if role != expected:
                raise DataError(
                    f"{where}: turn {j} is from {turn['from']!r} but roles must alternate human, gpt, "
                    f"human, ... starting with human"
                )
            if not isinstance(turn["value"], str):
                raise DataError(f"{where}: turn {j} 'value' is {type(turn['value']).__name__}, expected a string")
            _check_text(turn["value"], f"{where}: turn {j} 'value'")
            turns.append((role, turn["value"]))
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            # LLaVA-OneVision style lists of images are out of scope
            raise DataError(f"{where}: 'image' must be a string path, got {type(image).__name__}")
        if image is not None:
            _check_text(image, f"{where}: 'image'")
            if "\x00" in image:
                raise DataError(f"{where}: 'image' path contains a NUL character")
        extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
        samples.append(LlavaSample(id=sid, row=row, image=image, turns=turns, extra=extra, source=source))
    return samples


def _check_text(text: str, where: str) -> None:
    """DataError if ``text`` cannot be UTF-8 encoded (JSON's lone surrogates such as "\\ud800"
    decode to such strings; tokenizers and the cache's sample-id bytes would fail on them later)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where} is not valid Unicode ({e.reason} at character {e.start}); "
                        "fix the text in the JSON file") from e


def read_llava_json(path: str | os.PathLike) -> list[LlavaSample]:
    """Read a LLaVA JSON file -> samples in file order (``row`` = list index)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, UnicodeDecodeError (not UTF-8) and integers longer
        # than Python's 4300-digit str<->int limit; RecursionError a pathologically nested file
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {e})"[:1000]) from e
    return parse_llava(data, source=str(path))


def sample_to_json(sample: LlavaSample) -> dict[str, Any]:
    """Inverse of parse_llava for one sample (used to write subsets)."""
    obj: dict[str, Any] = {"id": sample.id}
    if sample.image is not None:
        obj["image"] = sample.image
    obj["conversations"] = [
        {"from": "human" if role == ROLE_USER else "gpt", "value": text} for role, text in sample.turns
    ]
    obj.update(sample.extra)
    return obj


@contextmanager
def _open_image(path: str | os.PathLike, sample: LlavaSample | None, verb: str):
    """``Image.open(path)`` with its failures as SampleError: missing_image when the file does not
    exist, corrupt_image ("cannot <verb> image file ...") for any decode error in the body."""
    sid, row, src = (sample.id, sample.row, sample.source) if sample else ("?", -1, None)
    path = Path(path)
    if not path.is_file():
        raise SampleError(sid, row, "missing_image", f"image file {path} does not exist", src)
    try:
        with Image.open(path) as im:
            yield im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError(sid, row, "corrupt_image", f"cannot {verb} image file {path} ({e})", src) from e


def load_image(path: str | os.PathLike, sample: LlavaSample | None = None) -> Image.Image:
    """Open and fully decode an image as RGB; SampleError(missing_image | corrupt_image) on failure."""
    with _open_image(path, sample, "decode") as im:
        im.load()  # decode now so truncated files fail here, not inside a DataLoader worker
        return im.convert("RGB")


def check_image(path: str | os.PathLike, sample: LlavaSample | None = None, *, decode: bool = False) -> None:
    """Cheap pre-flight check: the file exists and its header parses (``decode=True``: fully decode)."""
    if decode:
        load_image(path, sample)
        return
    with _open_image(path, sample, "read") as im:
        im.verify()  # header + structure, no pixel decode


class SkipCounter:
    """Counts skipped samples per reason; ``summary()`` -> 'skipped 3 samples: 2 missing_image, 1 too_long'."""

    def __init__(self, keep_examples: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.items: list[tuple[int, str, str]] = []  # (row, sample id, reason) of every skip
        self._keep = keep_examples

    def add(self, err: SampleError) -> None:
        self.counts[err.reason] += 1
        self.items.append((err.row, err.sample_id, err.reason))
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < self._keep:
            ex.append(str(err))

    def update(self, other: "SkipCounter") -> None:
        self.items.extend(other.items)
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self._keep - len(ex))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 samples"
        parts = ", ".join(f"{n} {r}" for r in SKIP_REASONS if (n := self.counts.get(r, 0)))
        noun = "sample" if self.total == 1 else "samples"
        return f"skipped {self.total} {noun}: {parts}"

    def report(self, file: TextIO | None = None, *, examples: bool = True) -> None:
        """Print the summary line (and one example message per reason) to ``file`` (stderr)."""
        file = file if file is not None else sys.stderr
        print(self.summary(), file=file)
        if examples:
            for r in SKIP_REASONS:
                if self.examples.get(r):
                    print(f"  e.g. {self.examples[r][0]}", file=file)

    def as_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples,
                "samples": [{"row": r, "id": i, "reason": why} for r, i, why in self.items]}

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()!r})"
