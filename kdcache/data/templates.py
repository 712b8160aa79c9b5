"""Conversation templates and tokenisation: the single source of truth for dump, train and eval.

``tokenize_sample`` turns a ``LlavaSample`` into token ids, labels and roles
(``kdcache.positions.ROLE_*``) with the image placeholder expanded to ``num_image_tokens``
copies of ``image_token_id``. The teacher dump and the student trainer both call it, and the
trainer checks its ids against the cached ones, so it must be deterministic.

Templates:
- ``"chat"``: the tokenizer's own chat template (``tokenizer.apply_chat_template``), e.g. ChatML
  for Qwen2.5: ``<|im_start|>user\\n<image>\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n``.
- ``"qwen2_base"``: TinyLLaVA's template for Qwen2 base models::

      {SYSTEM} USER: <image>\\nQ1 ASSISTANT: A1<|endoftext|>USER: Q2 ASSISTANT: A2<|endoftext|>

- ``"pretrain"``: LLaVA's "plain" caption template: ``<image>`` then the caption then ``\\n``;
  the human text is dropped. Exactly one human/gpt pair.

Response tokens are the assistant's text plus its end-of-turn token (``<|im_end|>``,
``<|endoftext|>``, or the ``\\n`` of ``pretrain``); template headers such as
``<|im_start|>assistant\\n`` or ``ASSISTANT: `` are prompt.

How (why not offsets): the rendered conversation is cut into segments at every response
boundary and each segment is tokenised on its own (``add_special_tokens=False``). A token can
then never straddle a prompt/response boundary, so roles are exact, and the generation prompt
(``tokenize_prompt``) is by construction a prefix of the training sequence. For ChatML the
boundaries fall on special tokens or newlines, where the tokenizer splits anyway, so the ids are
identical to tokenising the whole text at once. For ``qwen2_base`` tokenising ``ASSISTANT: `` and
``red`` apart differs from the joint `` red`` token, which is exactly what generation after the
prompt ``... ASSISTANT: `` produces.

Like LLaVA, the ``<image>`` placeholder is moved to the front of the first human turn:
``"<image>\\n" + text.strip()``, whether it was written before or after the text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from kdcache.config import TEMPLATES  # the one list of template names (config: stdlib only)
from kdcache.data.llava import IMAGE_TOKEN, ROLE_ASSISTANT, ROLE_USER, LlavaSample, SampleError
from kdcache.losses.reference import IGNORE_INDEX  # the label of a position without CE (HF's -100)
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL

QWEN2_BASE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN2_BASE_EOT = "<|endoftext|>"
PRETRAIN_EOT = "\n"


@dataclass
class Tokenized:
    sample_id: str
    row: int
    input_ids: np.ndarray  # int64 [T]  image span expanded to num_image_tokens x image_token_id
    labels: np.ndarray  # int64 [T]  = input_ids on response tokens, IGNORE_INDEX elsewhere
    roles: np.ndarray  # uint8 [T]  kdcache.positions.ROLE_*
    has_image: bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


# ----------------------------------------------------------------------------------------------
# validation


def _check_sample(sample: LlavaSample, *, need_response: bool) -> None:
    """Image-placeholder and response checks; SampleError naming the sample otherwise."""
    where = [(j, t.count(IMAGE_TOKEN)) for j, (_, t) in enumerate(sample.turns)]
    total = sum(n for _, n in where)
    if sample.has_image:
        if total == 0:
            raise SampleError.of(sample, "no_image_token", f"sample has image {sample.image!r} but no '<image>' in its text")
        if total > 1:
            raise SampleError.of(sample, "repeated_image_token", f"'<image>' appears {total} times")
        if where[0][1] != 1:
            turn = next(j for j, n in where if n)
            raise SampleError.of(sample, "no_image_token", f"'<image>' is in turn {turn}, not in the first human turn")
    elif total:
        raise SampleError.of(
            sample, "other", f"text-only sample (no 'image' key) contains '<image>' {total} time(s): add the image or remove the placeholder"
        )
    if need_response:
        answers = [t for r, t in sample.turns if r == ROLE_ASSISTANT]
        if not answers:
            raise SampleError.of(sample, "no_response", "the conversation has no gpt turn")
        for k, t in enumerate(answers):
            if not t.strip():
                raise SampleError.of(sample, "empty_response", f"gpt turn {k} is empty")


def _normalised_turns(sample: LlavaSample) -> list[tuple[str, str]]:
    turns = list(sample.turns)
    if sample.has_image:
        role, text = turns[0]
        turns[0] = (role, IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip())
    return turns


# ----------------------------------------------------------------------------------------------
# rendering: conversation -> [(text, is_response)] whose concatenation is the full text


def _special_strings(tokenizer) -> list[str]:
    """Every special token string of the tokenizer, longest first (greedy end-of-turn matching)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    specials.discard(IMAGE_TOKEN)
    return sorted(specials, key=len, reverse=True)


def _render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments_chat(sample: LlavaSample, tokenizer, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat_template; use template='qwen2_base' or "
            "'pretrain', or set tokenizer.chat_template"
        )
    messages = [{"role": r, "content": t} for r, t in turns]
    full = _render_chat(tokenizer, messages, add_generation_prompt=False)
    specials = _special_strings(tokenizer)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, (role, content) in enumerate(turns):
        if role != ROLE_ASSISTANT:
            continue
        # Everything before the assistant text is what generation would be prompted with.
        prefix = _render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        start = len(prefix)
        if not full.startswith(prefix) or not full.startswith(through) or full[start : start + len(content)] != content:
            raise SampleError.of(
                sample,
                "other",
                f"the chat template does not render assistant turn {i} verbatim after its generation "
                f"prompt (it rewrites the text or history); use template='qwen2_base' or a plain chat template",
            )
        end = start + len(content)
        # end-of-turn = the run of special tokens right after the text (e.g. <|im_end|>, not the \n)
        stop = len(through)
        while end < stop:
            tok = next((s for s in specials if full.startswith(s, end) and end + len(s) <= stop), None)
            if tok is None:
                break
            end += len(tok)
        if start > cursor:
            segments.append((full[cursor:start], False))
        segments.append((full[start:end], True))
        cursor = end
    if cursor < len(full):
        segments.append((full[cursor:], False))
    return segments


def _segments_qwen2_base(sample: LlavaSample, tokenizer, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    if tokenizer.convert_tokens_to_ids(QWEN2_BASE_EOT) in (None, tokenizer.unk_token_id):
        raise ValueError(f"template 'qwen2_base' needs {QWEN2_BASE_EOT!r} in the tokenizer's vocabulary")
    segments: list[tuple[str, bool]] = []
    prompt = QWEN2_BASE_SYSTEM + " "
    for role, text in turns:
        if role == ROLE_USER:
            prompt += "USER: " + text + " "
        else:
            segments.append((prompt + "ASSISTANT: ", False))
            segments.append((text + QWEN2_BASE_EOT, True))
            prompt = ""
    if prompt:
        segments.append((prompt, False))
    return segments


def _segments_pretrain(sample: LlavaSample, tokenizer, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    if not sample.has_image:
        raise SampleError.of(sample, "other", "template 'pretrain' needs an image; this sample is text-only")
    if len(turns) != 2:
        raise SampleError.of(
            sample, "other", f"template 'pretrain' takes one human/gpt pair, this sample has {len(turns)} turns"
        )
    return [(IMAGE_TOKEN, False), (turns[1][1] + PRETRAIN_EOT, True)]


_SEGMENTERS = {"chat": _segments_chat, "qwen2_base": _segments_qwen2_base, "pretrain": _segments_pretrain}


def render_segments(sample: LlavaSample, tokenizer, *, template: str, need_response: bool = True) -> list[tuple[str, bool]]:
    """Validated, rendered conversation as [(text, is_response)]; ''.join(texts) is the full text."""
    if template not in _SEGMENTERS:
        raise ValueError(f"unknown template {template!r}: choose from {TEMPLATES}")
    _check_sample(sample, need_response=need_response)
    return _SEGMENTERS[template](sample, tokenizer, _normalised_turns(sample))


# ----------------------------------------------------------------------------------------------
# tokenisation


def image_placeholder_id(tokenizer) -> int:
    """The tokenizer's id of the single '<image>' token (raises if it is not one special token)."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if tid is None or ids != [tid]:
        raise ValueError(
            f"the tokenizer does not encode '<image>' as one token (got {ids}); add it with "
            "tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']}) and resize the model"
        )
    return int(tid)


def _encode_segments(
    sample: LlavaSample,
    segments: list[tuple[str, bool]],
    tokenizer,
    image_token_id: int,
    num_image_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Segments -> (ids int64 [T], roles uint8 [T]) with the image placeholder expanded."""
    placeholder = image_placeholder_id(tokenizer)
    texts = [t for t, _ in segments]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = np.fromiter((i for seg in enc for i in seg), dtype=np.int64)
    roles = np.concatenate(
        [np.full(len(seg), ROLE_RESPONSE if resp else ROLE_PROMPT, dtype=np.uint8) for seg, (_, resp) in zip(enc, segments)]
        or [np.zeros(0, np.uint8)]
    )
    hits = np.nonzero(ids == placeholder)[0]
    if sample.has_image:
        if len(hits) != 1 or roles[hits[0]] != ROLE_PROMPT:
            raise SampleError.of(sample, "repeated_image_token" if len(hits) > 1 else "no_image_token",
                                 f"expected one '<image>' token in the prompt after rendering, found {len(hits)}")
        p = int(hits[0])
        ids = np.concatenate([ids[:p], np.full(num_image_tokens, image_token_id, np.int64), ids[p + 1 :]])
        roles = np.concatenate([roles[:p], np.full(num_image_tokens, ROLE_VISUAL, np.uint8), roles[p + 1 :]])
    elif len(hits):
        raise SampleError.of(sample, "other", "text-only sample renders an '<image>' token (from the template?)")
    return ids, roles


def tokenize_sample(
    sample: LlavaSample,
    tokenizer,
    *,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None,
    on_too_long: Literal["error", "truncate"] = "error",
) -> Tokenized:
    """Render + tokenise one training sample.

    Returns input_ids / labels int64 [T] and roles uint8 [T] with T <= max_length; the image span
    is ``num_image_tokens`` x ``image_token_id`` with ROLE_VISUAL; ``labels[t] = input_ids[t]``
    where ``roles[t] == ROLE_RESPONSE`` and -100 elsewhere.

    Raises SampleError (reason in SKIP_REASONS) for an unusable sample; callers skip or raise.
    ``on_too_long="error"`` raises SampleError('too_long') when T > max_length;
    ``"truncate"`` cuts the tail, still raising 'too_long' if the cut would split the image span
    or leave no response token.
    """
    if on_too_long not in ("error", "truncate"):
        raise ValueError(f"on_too_long must be 'error' or 'truncate', got {on_too_long!r}")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    segments = render_segments(sample, tokenizer, template=template, need_response=True)
    ids, roles = _encode_segments(sample, segments, tokenizer, image_token_id, num_image_tokens)
    if max_length is not None and len(ids) > max_length:
        detail = f"{len(ids)} tokens (image expanded to {num_image_tokens}) > max_length {max_length}"
        if on_too_long == "error":
            raise SampleError.of(sample, "too_long", detail)
        vis = np.nonzero(roles == ROLE_VISUAL)[0]
        if len(vis) and vis[-1] >= max_length:
            raise SampleError.of(sample, "too_long", detail + "; truncating would cut the image span")
        ids, roles = ids[:max_length], roles[:max_length]
        if not (roles == ROLE_RESPONSE).any():
            raise SampleError.of(sample, "too_long", detail + "; truncating leaves no response token")
    if not (roles == ROLE_RESPONSE).any():
        raise SampleError.of(sample, "empty_response", "the response tokenises to nothing")
    labels = np.where(roles == ROLE_RESPONSE, ids, IGNORE_INDEX).astype(np.int64)
    return Tokenized(sample.id, sample.row, ids, labels, roles, sample.has_image)


def tokenize_prompt(
    sample: LlavaSample,
    tokenizer,
    *,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
) -> Tokenized:
    """Generation prompt for the sample's last question: every token before its answer.

    If the sample ends with a gpt turn, that answer is left out (the gold answer of an eval
    sample); if it ends with a human turn, the prompt asks for its answer. The ids are exactly the
    prefix ``tokenize_sample`` produces before the last response. labels are all -100.
    """
    turns = list(sample.turns)
    if turns[-1][0] == ROLE_USER:
        # Placeholder answer: the segments before the last response do not depend on its text.
        turns.append((ROLE_ASSISTANT, "."))
    probe = LlavaSample(sample.id, sample.row, sample.image, turns, sample.extra, sample.source)
    segments = render_segments(probe, tokenizer, template=template, need_response=False)
    last = max(i for i, (_, resp) in enumerate(segments) if resp)
    ids, roles = _encode_segments(probe, segments[:last], tokenizer, image_token_id, num_image_tokens)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    return Tokenized(sample.id, sample.row, ids, labels, roles, sample.has_image)


def template_fingerprint(tokenizer, *, template: str, image_token_id: int, num_image_tokens: int) -> dict[str, Any]:
    """What the token ids depend on, for the cache's tokenizer/template fingerprint (JSON-able)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    vocab_sha = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    chat = getattr(tokenizer, "chat_template", None) if template == "chat" else None
    return {
        "template": template,
        "chat_template_sha256": hashlib.sha256(chat.encode()).hexdigest() if isinstance(chat, str) else None,
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_sha,
        "image_token": IMAGE_TOKEN,
        "image_token_id": int(image_token_id),
        "num_image_tokens": int(num_image_tokens),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
