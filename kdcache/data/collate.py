"""Torch dataset and collation for LLaVA samples.

``prepare`` tokenises every sample once up front and checks its image file, so bad samples are
counted and dropped before any DataLoader sees them; ``LlavaTorchDataset`` then only loads and
preprocesses images. ``collate`` right-pads a batch for ``LlavaForConditionalGeneration``, which
takes ``pixel_values`` only for the samples that have an image, in batch order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from kdcache.data.llava import (SKIP_REASONS, DataError, LlavaSample, SampleError, SkipCounter, check_image, fix_for,
                                 load_image)
from kdcache.data.templates import IGNORE_INDEX, Tokenized, tokenize_sample

ROLE_PAD = 255  # roles value on padding: matches no kdcache.positions.ROLE_*


def prepare(
    samples: Sequence[LlavaSample],
    tokenizer,
    *,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None,
    images_root: str | os.PathLike | None,
    on_error: Literal["skip", "raise"] = "skip",
    on_too_long: Literal["error", "truncate"] = "error",
    check_images: Literal["none", "header", "decode"] = "header",
    num_proc: int = 1,
    keep_tokens: bool = True,
) -> tuple[list[LlavaSample], list[Tokenized], SkipCounter]:
    """Tokenise all samples and pre-check their images -> (kept samples, their Tokenized, skips).

    ``on_error="skip"`` counts each SampleError in the SkipCounter and drops the sample;
    ``"raise"`` re-raises the first. ``check_images``: "header" opens each image's header (cheap),
    "decode" decodes it fully (catches truncated files, reads every pixel once), "none" skips it.
    ``num_proc`` > 1 spreads the samples over that many processes (forked, in chunks, results in
    sample order: the same output as one process; a first error is the first in sample order).
    ``keep_tokens=False`` returns no Tokenized (an empty list): only which samples are usable,
    in memory that does not grow with the token count.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if check_images not in ("none", "header", "decode"):
        raise ValueError(f"check_images must be 'none', 'header' or 'decode', got {check_images!r}")
    kw = dict(template=template, image_token_id=image_token_id, num_image_tokens=num_image_tokens,
              max_length=max_length, images_root=images_root, on_error=on_error, on_too_long=on_too_long,
              check_images=check_images, keep_tokens=keep_tokens)
    if num_proc > 1 and len(samples) > PARALLEL_MIN_SAMPLES:
        return _prepare_parallel(samples, tokenizer, kw, num_proc)
    kept: list[LlavaSample] = []
    toks: list[Tokenized] = []
    skipped = SkipCounter()
    for s in samples:
        try:
            tok = tokenize_sample(
                s,
                tokenizer,
                template=template,
                image_token_id=image_token_id,
                num_image_tokens=num_image_tokens,
                max_length=max_length,
                on_too_long=on_too_long,
            )
            if s.has_image and check_images != "none":
                if images_root is None:
                    raise ValueError(f"sample {s.id!r} has an image but images_root is None: pass the image folder")
                check_image(Path(images_root) / s.image, s, decode=check_images == "decode")
        except SampleError as e:
            if on_error == "raise":
                raise
            skipped.add(e)
            continue
        kept.append(s)
        if keep_tokens:
            toks.append(tok)
    return kept, toks, skipped


# Below this many samples one process is faster than starting a pool.
PARALLEL_MIN_SAMPLES = 512
_POOL_CHUNK = 256  # samples per task: large enough to amortise the pickling, small enough to balance
_pool_state: dict[str, Any] = {}


def _pool_init(tokenizer, kw: dict) -> None:
    _pool_state.update(tokenizer=tokenizer, kw=kw)


def _pool_task(chunk):
    return prepare(chunk, _pool_state["tokenizer"], **_pool_state["kw"])


def _prepare_parallel(samples, tokenizer, kw: dict, num_proc: int):
    """``prepare`` over ``num_proc`` forked processes, chunk by chunk, merged in sample order."""
    import multiprocessing as mp

    chunks = [samples[i:i + _POOL_CHUNK] for i in range(0, len(samples), _POOL_CHUNK)]
    kept: list[LlavaSample] = []
    toks: list[Tokenized] = []
    skipped = SkipCounter()
    # fork: the workers share the parent's samples and tokenizer instead of unpickling them
    with mp.get_context("fork").Pool(min(num_proc, len(chunks)), initializer=_pool_init,
                                     initargs=(tokenizer, kw)) as pool:
        for k, t, sk in pool.imap(_pool_task, chunks):  # in chunk order; a worker's SampleError re-raises here
            kept += k
            toks += t
            skipped.update(sk)
    return kept, toks, skipped


def prepare_samples(
    samples: Sequence[LlavaSample],
    tokenizer,
    *,
    images_root: str | os.PathLike | None,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None,
    on_too_long: Literal["skip", "error", "truncate"],
    num_proc: int = 1,
    keep_tokens: bool = True,
) -> tuple[list[LlavaSample], list[Tokenized], SkipCounter]:
    """``prepare`` with the run policy of dump and train (``kdcache.config.ON_TOO_LONG``): every
    bad sample is skipped and counted, except that ``on_too_long="error"`` makes an over-long
    sample stop the run, and ``"truncate"`` cuts it to ``max_length`` tokens (skipped as
    too_long only if the cut would split its image span or leave no response token).
    ``num_proc``, ``keep_tokens``: as ``prepare``'s."""
    from kdcache.config import ON_TOO_LONG

    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long must be one of {', '.join(ON_TOO_LONG)}, got {on_too_long!r}")
    kept, toks, skipped = prepare(samples, tokenizer, template=template, image_token_id=image_token_id,
                                  num_image_tokens=num_image_tokens, max_length=max_length,
                                  images_root=images_root, on_error="skip",
                                  on_too_long="truncate" if on_too_long == "truncate" else "error",
                                  num_proc=num_proc, keep_tokens=keep_tokens)
    if on_too_long == "error" and skipped.counts.get("too_long"):
        raise ValueError(f"{skipped.counts['too_long']} sample(s) exceed max_length {max_length}, e.g. "
                         f"{skipped.examples['too_long'][0]} (or pass --on-too-long skip to count and skip them, "
                         "or truncate to cut them to max_length)")
    return kept, toks, skipped


def all_skipped_error(skipped: SkipCounter, data: str, images, job: str, outcome: str) -> DataError:
    """The error of a ``job`` (dump, train, eval) in which every sample was skipped: one line with
    the reason counts, an example and the likely fix (a wrong --images, most often), then
    ``outcome`` (what was, or was not, written)."""
    counts = ", ".join(f"{n} {r}" for r in SKIP_REASONS if (n := skipped.counts.get(r, 0)))
    top = max(skipped.counts, key=skipped.counts.get)
    example = (skipped.examples.get(top) or [""])[0].split(". Fix:")[0]  # the SampleError without its advice
    fix = (f"--images must be the directory the JSON's image paths are relative to (got {images}; "
           "`kdcache make-data --out DIR` writes them relative to DIR/images)" if top == "missing_image"
           else fix_for(top))
    return DataError(f"{job}: every sample of {data} was skipped ({counts}; e.g. {example}); {outcome}. "
                     f"Likely fix: {fix}")


class LlavaTorchDataset(torch.utils.data.Dataset):
    """Map-style dataset of tokenised LLaVA samples with preprocessed images.

    Item: dict(sample_id str, row int, input_ids int64 [T], labels int64 [T], roles uint8 [T],
    pixel_values float [3, H, W] or None). Bad samples are dropped at construction (``skipped``
    counts them, and the summary is printed to stderr) unless ``on_error="raise"``.
    An image that passed the header check but fails to decode (a truncated JPEG) raises its
    SampleError in ``__getitem__``; with ``image_errors="skip"`` (``from_prepared``) the item is
    dict(sample_id, row, skipped=reason, error=message) instead, for the caller to record.
    """

    image_errors = "raise"

    def __init__(
        self,
        samples: Sequence[LlavaSample],
        tokenizer,
        image_processor,
        images_root: str | os.PathLike | None,
        *,
        template: str,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int | None,
        on_error: Literal["skip", "raise"] = "skip",
        on_too_long: Literal["error", "truncate"] = "error",
        check_images: Literal["none", "header", "decode"] = "header",
        verbose: bool = True,
    ):
        self.image_processor = image_processor
        self.images_root = Path(images_root) if images_root is not None else None
        self.samples, self.tokenized, self.skipped = prepare(
            samples,
            tokenizer,
            template=template,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            max_length=max_length,
            images_root=images_root,
            on_error=on_error,
            on_too_long=on_too_long,
            check_images=check_images,
        )
        if verbose and self.skipped.total:
            self.skipped.report()

    @classmethod
    def from_prepared(cls, samples, tokenized, image_processor, images_root,
                      image_errors: Literal["raise", "skip"] = "raise") -> "LlavaTorchDataset":
        """A dataset over samples ``prepare`` already tokenised and checked (no second pass);
        ``image_errors``: see the class docstring."""
        if image_errors not in ("raise", "skip"):
            raise ValueError(f"image_errors must be 'raise' or 'skip', got {image_errors!r}")
        self = cls.__new__(cls)
        self.image_errors = image_errors
        self.image_processor = image_processor
        self.images_root = Path(images_root) if images_root is not None else None
        self.samples, self.tokenized, self.skipped = list(samples), list(tokenized), SkipCounter()
        return self

    def __len__(self) -> int:
        return len(self.samples)

    def pixel_values(self, sample: LlavaSample) -> torch.Tensor:
        """[3, H, W] float: the image as the processor prepares it (resize, rescale, normalise)."""
        return pixel_values(sample, self.image_processor, self.images_root)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, t = self.samples[i], self.tokenized[i]
        try:
            return make_item(s, t, self.image_processor, self.images_root)
        except SampleError as e:
            if self.image_errors == "raise":
                raise
            return {"sample_id": t.sample_id, "row": t.row, "skipped": e.reason, "error": str(e)}


def pixel_values(sample: LlavaSample, image_processor, images_root) -> torch.Tensor:
    """[3, H, W] float: the sample's image as the processor prepares it (resize, rescale, normalise)."""
    if images_root is None:
        raise ValueError(f"sample {sample.id!r} has an image but images_root is None: pass the image folder")
    img = load_image(Path(images_root) / sample.image, sample)
    return image_processor(images=img, return_tensors="pt")["pixel_values"][0]


def make_item(sample: LlavaSample, t: Tokenized, image_processor, images_root) -> dict[str, Any]:
    """One dataset item: sample_id, row, input_ids / labels int64 [T], roles uint8 [T],
    pixel_values [3, H, W] or None."""
    return {
        "sample_id": t.sample_id,
        "row": t.row,
        "input_ids": torch.from_numpy(t.input_ids),
        "labels": torch.from_numpy(t.labels),
        "roles": torch.from_numpy(t.roles),
        "pixel_values": pixel_values(sample, image_processor, images_root) if sample.has_image else None,
    }


def collate(items: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch.

    Returns input_ids int64 [B, T] (pad_token_id on padding), attention_mask int64 [B, T],
    labels int64 [B, T] (-100 on padding), roles uint8 [B, T] (255 on padding),
    pixel_values [n_img, 3, H, W] for the samples with an image, in batch order (None if none),
    has_image bool [B], sample_ids list[str], rows list[int]. T = longest sample.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    B = len(items)
    lengths = [int(it["input_ids"].shape[0]) for it in items]
    T = max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    roles = torch.full((B, T), ROLE_PAD, dtype=torch.uint8)
    for b, (it, n) in enumerate(zip(items, lengths)):
        input_ids[b, :n] = torch.as_tensor(it["input_ids"])
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.as_tensor(it["labels"])
        roles[b, :n] = torch.as_tensor(it["roles"])
    pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "roles": roles,
        "pixel_values": torch.stack(pix) if pix else None,  # [n_img, 3, H, W]
        "has_image": torch.tensor([it["pixel_values"] is not None for it in items], dtype=torch.bool),
        "sample_ids": [it["sample_id"] for it in items],
        "rows": [int(it["row"]) for it in items],
    }


def length_batches(lengths: Sequence[int], batch_size: int, windows: Sequence[int]) -> list[list[int]]:
    """Batches of indices with little padding: sorted by length inside windows.

    ``windows[i]`` is sample i's window (non-decreasing: windows are runs of consecutive
    samples); inside each window the samples are sorted by length (longest first, ties by index)
    and cut into batches of ``batch_size``. A sample never leaves its window, so a consumer that
    restores the original order (``kdcache.dump`` writes in row order) buffers at most one
    window, and the batches are a pure function of (lengths, windows).
    lengths [S], windows [S] -> list of index batches covering range(S) once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(windows) != len(lengths) or any(b < a for a, b in zip(windows, windows[1:])):
        raise ValueError("windows must give one non-decreasing window number per sample")
    out: list[list[int]] = []
    i = 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and windows[j] == windows[i]:
            j += 1
        idx = sorted(range(i, j), key=lambda t: (-int(lengths[t]), t))
        out += [idx[b:b + batch_size] for b in range(0, len(idx), batch_size)]
        i = j
    return out


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the batches' [B, T_max] token slots that are padding."""
    slots = sum(len(b) * max(int(lengths[i]) for i in b) for b in batches if b)
    return 1.0 - sum(int(n) for n in lengths) / slots if slots else 0.0


class WindowDataset(torch.utils.data.IterableDataset):
    """The dump's input, streamed: windows of consecutive samples, each tokenised, checked, sorted
    by length and cut into collated batches by the DataLoader worker that owns it.

    ``windows``: lists of LlavaSample (consecutive rows); window ``w`` goes to worker
    ``w % num_workers``, so a ``DataLoader(batch_size=None)`` yields the windows in order (it takes
    the workers' items round-robin). Nothing is tokenised up front: the first batch is ready after
    one window, whatever the dataset's size, and no process holds more than its windows in flight
    (memory flat in the sample count). Batches are ``length_batches`` of the window's kept samples,
    hence the same as tokenising everything first and bucketing by window.

    Item (one per window): rows (every row of the window, in order), skipped (a SkipCounter of its
    bad samples), failed (items whose image failed to decode here: row, sample_id, skipped = the
    reason, error), batches (``collate`` of each batch, longest first), tokens and
    slots (its real and padded token counts). ``on_too_long="error"`` raises ValueError on the
    window holding an over-long sample (``prepare_samples``).
    """

    def __init__(self, windows, tokenizer, image_processor, images_root, *, batch_size: int, template: str,
                 image_token_id: int, num_image_tokens: int, max_length: int | None,
                 on_too_long: Literal["skip", "error", "truncate"]):
        super().__init__()
        self.windows = list(windows)
        self.tokenizer, self.image_processor, self.images_root = tokenizer, image_processor, images_root
        self.batch_size = batch_size
        self.kw = dict(template=template, image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                       max_length=max_length, on_too_long=on_too_long)

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, samples) -> dict[str, Any]:
        kept, toks, skipped = prepare_samples(samples, self.tokenizer, images_root=self.images_root, **self.kw)
        # an image that fails to decode only here is reported, not raised (LlavaTorchDataset image_errors)
        ds = LlavaTorchDataset.from_prepared(kept, toks, self.image_processor, self.images_root, image_errors="skip")
        lengths = [t.num_tokens for t in toks]
        batches = length_batches(lengths, self.batch_size, [0] * len(lengths))
        out, failed = [], []
        for b in batches:
            items = [ds[i] for i in b]
            failed += [it for it in items if "skipped" in it]
            good = [it for it in items if "skipped" not in it]
            if good:
                out.append(collate(good, self.tokenizer.pad_token_id))
        return {"rows": [s.row for s in samples], "skipped": skipped, "failed": failed, "batches": out,
                "tokens": sum(lengths), "slots": sum(len(b) * max(lengths[i] for i in b) for b in batches)}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for w in range(worker, len(self.windows), nw):
            yield self.window(self.windows[w])
