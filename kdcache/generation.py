"""Batched generation with a Hugging Face LLaVA model: the one implementation ``kdcache eval``
(greedy) and ``kdcache generate`` (greedy or sampled) share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus the end-of-turn tokens of our templates that the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>"):
        if t in vocab:
            ids.add(int(vocab[t]))
    if not ids:
        raise ValueError("the tokenizer has no eos token and no <|im_end|> / <|endoftext|>: cannot stop generation")
    return sorted(ids)


def left_pad(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id sequences -> input_ids int64 [B, T], attention_mask int64 [B, T]."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[np.ndarray], pixel_values: torch.Tensor | None, *,
                   max_new_tokens: int, temperature: float, top_p: float, cut_newline: bool) -> list[str]:
    """Answers to a batch of tokenised prompts, greedy (temperature 0) or sampled.

    prompts: int64 [T_b] each, left-padded here; pixel_values [n_img, 3, H, W] for the prompts
    with an image, in order, or None. Each answer is the text before the first stop token
    (``stop_token_ids``), stripped; ``cut_newline`` also cuts at a newline
    (the ``pretrain`` template's end of turn).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(prompts, pad)  # [B, T]
    device = model.device
    stops = stop_token_ids(tokenizer)
    # transformers' generate() runs the vision tower on any pixel_values key, None included.
    extra: dict[str, Any] = {}
    if pixel_values is not None:
        extra["pixel_values"] = pixel_values.to(device=device, dtype=model.dtype)
    if temperature > 0:
        extra.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        extra.update(do_sample=False)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         num_beams=1, eos_token_id=stops, pad_token_id=pad, **extra)
    new = out[:, ids.shape[1]:].cpu()  # [B, <= max_new_tokens]
    answers = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        text = tokenizer.decode(row[:cut], skip_special_tokens=True)
        if cut_newline:
            text = text.split("\n", 1)[0]
        answers.append(text.strip())
    return answers
