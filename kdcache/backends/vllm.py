"""vLLM teacher backend: teacher records from vLLM's prompt log-probs (``pip install 'kdcache[vllm]'``).

    kdcache dump --backend vllm --teacher runs/teacher-sft --data data/instruct.json --images data \\
        --out caches/t-vllm.zarr --top-k 64 --hidden none --batch-size 256     # log-probs only
    kdcache dump --backend vllm --hidden bf16 ...     # hybrid: + visual hidden states from an HF forward

One request per sample: the teacher-forced token ids (image span already expanded, exactly the
ids ``kdcache.data.templates.tokenize_sample`` gives the HF path) plus the PIL image, with
``SamplingParams(prompt_logprobs=k, max_tokens=1)``. vLLM then returns, per prompt token j, the
log-probs of the top-k tokens at j given tokens < j (``prompt_logprobs[j]``; entry 0 is None),
plus the actual prompt token's own entry when it is not among them (k or k+1 entries). Our
position t (the output at t, predicting token t+1) is vLLM's entry t+1.

API relied on (vLLM docs, checked with the project's search tool):
- ``vllm.logprobs``: ``PromptLogprobs = list[Optional[dict[int, Logprob]]]``; ``Logprob`` is a
  dataclass with ``logprob: float``, ``rank: Optional[int]`` ("vocab rank ... (>=1)") and
  ``decoded_token: Optional[str]`` (docs.vllm.ai/en/v0.10.2/api/vllm/logprobs.html).
- ``LogprobsProcessor.from_new_request``: "logprob of first prompt token is None"
  (docs.vllm.ai/en/v0.9.2/api/vllm/v1/engine/logprobs.html).
- ``SamplingParams(prompt_logprobs: int | None, max_tokens, detokenize)``
  (docs.vllm.ai/en/v0.8.3/api/inference_params.html).
- ``logprobs_mode="raw_logprobs"``: log-probs from the raw logits, before penalties, temperature
  or logits processors (the V1 ``Sampler`` docstring, docs.vllm.ai/en/v0.20.0/api/vllm/v1/sample/sampler/).
- ``TokensPrompt``: ``{"prompt_token_ids": list[int], "multi_modal_data": {...}}``
  (docs.vllm.ai/en/v0.8.3/api/offline_inference/llm_inputs.html).

What this backend cannot give, and what the cache says about it (settings ``backend: vllm``):
- **No hidden states from vLLM**: the engine returns none. With ``--hidden none`` the cache has
  ``hidden: none`` and relation ``none`` (no L_rel targets). Otherwise (hybrid mode) the dump
  takes them from the Hugging Face teacher it has loaded anyway, run on each sample's prefix up to
  the end of the image span (``kdcache.teacher.visual_hidden_states``), and merges them into
  vLLM's records (``with_hidden``).
- **Tail from the head only**: vLLM returns no logits, so the tail log-mass can only be
  ``log(1 - sum_i exp(l_i))`` over the k returned log-probs, computed here as
  ``log(-expm1(logsumexp(l)))`` in float64 (exact for the given numbers). The log-probs come in
  float32, so the tail *mass* carries an absolute error of about ``k * 2^-24``: fine while the
  tail holds more than ~1e-4 of the mass, noisy below ~1e-6, and clamped to -inf when the
  rounded head sums to >= 1. The HF backend computes the tail as a log-sum-exp over the logits
  outside the top-k and has no such floor (design section 2).
- **Temperature 1 only**: raw log-probs are at T = 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..config import VLLM_GPU_MEMORY_ALONE, VllmConfig
from ..positions import ROLE_VISUAL, select_positions, visual_span
from ..records import TeacherRecord
from . import BackendUnavailable

INSTALL_HINT = "pip install 'kdcache[vllm]'"


def _entry_items(entry: Mapping) -> list[tuple[int, float, int | None]]:
    """One vLLM prompt-log-prob dict -> [(token id, log-prob, rank or None)].

    Values may be ``Logprob`` objects (``.logprob``, ``.rank``), plain floats (the flat form:
    no rank), or dicts ``{"logprob": ..., "rank": ...}`` (e.g. after a JSON round trip, where
    keys also become strings)."""
    items = []
    for tid, v in entry.items():
        if isinstance(v, (int, float)):
            lp, rank = float(v), None
        elif isinstance(v, Mapping):
            lp = float(v["logprob"])
            rank = v["rank"] if "rank" in v else None
        else:
            lp, rank = float(v.logprob), getattr(v, "rank", None)
        items.append((int(tid), lp, None if rank is None else int(rank)))
    return items


def _top_k_of_entry(entry: Mapping, k: int, *, where: str) -> tuple[list[int], list[float]]:
    """The k top entries of one position sorted by rank (ties: larger log-prob first).

    With ranks, the extra actual-token entry (rank > k) is dropped; without ranks (flat floats)
    the k largest log-probs are kept, which drops the same entry since it is below the top k."""
    items = _entry_items(entry)
    if len(items) < k:
        raise ValueError(f"{where}: vLLM returned {len(items)} log-probs, need top-k = {k}; "
                         f"run vLLM with SamplingParams(prompt_logprobs={k}) and max_logprobs >= {k}")
    items.sort(key=lambda it: (math.inf if it[2] is None else it[2], -it[1], it[0]))
    top = items[:k]
    bad = [it for it in top if it[2] is not None and it[2] > k]
    if bad:
        raise ValueError(f"{where}: only {k - len(bad)} of the entries have rank <= {k} (ranks "
                         f"{sorted(it[2] for it in items)}): vLLM was asked for fewer than {k} prompt log-probs")
    return [it[0] for it in top], [it[1] for it in top]


def tail_from_head(logprobs: np.ndarray) -> np.ndarray:
    """Tail log-mass ``log(1 - sum_i exp(l_i))`` from the head alone, per row.

    logprobs float [P, k] -> float64 [P] in [-inf, 0]. Computed as ``log(-expm1(lse))`` with
    ``lse = logsumexp(l)`` in float64: no cancellation in ``1 - sum`` beyond the inputs' own
    rounding. A head that sums to >= 1 (rounding) gives -inf.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    m = lp.max(axis=1, keepdims=True)  # [P, 1]
    lse = (m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True)))[:, 0]  # [P]
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(lse < 0, np.log(-np.expm1(np.minimum(lse, 0.0))), -np.inf)
    return np.minimum(tail, 0.0)


def records_from_prompt_logprobs(prompt_logprobs: Sequence[Mapping | None], *, input_ids, roles, sample_id: str,
                                 row: int, kinds: tuple[str, ...], top_k: int,
                                 vocab_size: int | None = None) -> TeacherRecord:
    """Convert vLLM's prompt log-probs of one request into a ``TeacherRecord``.

    prompt_logprobs: list of length T (entry j: {token id: Logprob | float | dict} for the token
    at j given tokens < j; entry 0 is None); input_ids int [T] and roles uint8 [T] are our
    tokenisation with the image span expanded, exactly the ids sent to vLLM.
    -> TeacherRecord with positions/kinds from ``select_positions(roles, kinds)``, topk_ids int32
    [P, k] and topk_logprobs float32 [P, k] sorted by rank, tail_logmass float32 [P]
    (``tail_from_head``; -inf when k == vocab_size), visual_hidden None (vLLM gives no hidden
    states).
    """
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.int32)
    roles_np = np.asarray(roles, dtype=np.uint8)
    T = int(ids.shape[0])
    if roles_np.shape[0] != T:
        raise ValueError(f"sample {sample_id!r} (row {row}): {T} input ids but {roles_np.shape[0]} roles")
    if len(prompt_logprobs) != T:
        n_vis = len(visual_span(roles_np))
        raise ValueError(
            f"sample {sample_id!r} (row {row}): vLLM returned prompt log-probs for {len(prompt_logprobs)} tokens, "
            f"our prompt has {T} (image span expanded to {n_vis} tokens): vLLM expanded the image placeholder "
            "differently (check the model's vision_feature_select_strategy / image size in vLLM and here), "
            "or the prompt was truncated (raise vLLM's max_model_len)")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    pos, kc = select_positions(roles_np, kinds)
    P = len(pos)
    out_ids = np.empty((P, top_k), dtype=np.int32)
    out_lp = np.empty((P, top_k), dtype=np.float64)
    for i, t in enumerate(pos.tolist()):
        entry = prompt_logprobs[t + 1]  # output at t predicts token t+1
        where = f"sample {sample_id!r} (row {row}), position {t} (vLLM prompt entry {t + 1})"
        if entry is None:
            raise ValueError(f"{where}: vLLM gave no log-probs there (only entry 0 may be None)")
        tids, lps = _top_k_of_entry(entry, top_k, where=where)
        out_ids[i] = tids
        out_lp[i] = lps
    if vocab_size is not None and top_k == vocab_size:
        tail = np.full(P, -np.inf)  # the whole vocabulary is in the head: exact, as in kdcache.teacher
    else:
        tail = tail_from_head(out_lp)
    return TeacherRecord(
        sample_id=str(sample_id), row=int(row), input_ids=ids, roles=torch.from_numpy(roles_np.copy()),
        positions=torch.from_numpy(pos), kinds=torch.from_numpy(kc),
        topk_ids=torch.from_numpy(out_ids), topk_logprobs=torch.from_numpy(out_lp.astype(np.float32)),
        tail_logmass=torch.from_numpy(tail.astype(np.float32)), visual_hidden=None)


def with_hidden(records: Sequence[TeacherRecord], hidden: Sequence[torch.Tensor]) -> list[TeacherRecord]:
    """vLLM's records (``visual_hidden`` None) with each sample's visual hidden states put in.

    hidden[i]: [N_vis_i, D] for records[i] (the HF forward's, ``kdcache.teacher.visual_hidden_states``),
    where N_vis_i is the number of visual roles of the record; moved to the CPU like the records.
    """
    if len(records) != len(hidden):
        raise ValueError(f"{len(records)} vLLM records but {len(hidden)} hidden-state blocks")
    out = []
    for r, h in zip(records, hidden):
        n_vis = int((r.roles == ROLE_VISUAL).sum())
        if h.ndim != 2 or h.shape[0] != n_vis:
            raise ValueError(f"sample {r.sample_id!r} (row {r.row}): hidden states of shape {tuple(h.shape)} for "
                             f"{n_vis} visual tokens: the HF forward and vLLM saw different prompts")
        out.append(dataclasses.replace(r, visual_hidden=h.cpu()))
    return out


def import_vllm():
    """``(LLM, SamplingParams)`` from vLLM, or BackendUnavailable saying how to install it."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise BackendUnavailable(f"the vLLM teacher backend needs vLLM, which is not installed ({e}): "
                                 f"{INSTALL_HINT}, or use the default --backend hf") from e
    return LLM, SamplingParams


def vllm_prompt(input_ids, image) -> dict[str, Any]:
    """One ``TokensPrompt``: the teacher-forced ids (image span expanded) and the PIL image."""
    p: dict[str, Any] = {"prompt_token_ids": [int(i) for i in input_ids]}
    if image is not None:
        p["multi_modal_data"] = {"image": image}
    return p


class VllmTeacher:
    """A LLaVA teacher served by vLLM's offline engine; ``records`` gives ``TeacherRecord``s.

    The engine is built once: ``max_logprobs`` admits k, prefix caching is off (it would skip
    computing the log-probs of cached prompt tokens), and ``logprobs_mode="raw_logprobs"``
    gives the model's own distribution at temperature 1. ``engine``: ``kdcache.config.VllmConfig``;
    ``gpu_memory_utilization``: vLLM's share of each GPU (``kdcache.config.vllm_gpu_memory_utilization``).
    """

    def __init__(self, model_dir: str, *, top_k: int, engine: VllmConfig | None = None,
                 gpu_memory_utilization: float = VLLM_GPU_MEMORY_ALONE, vocab_size: int | None = None):
        LLM, SamplingParams = import_vllm()
        engine = engine if engine is not None else VllmConfig()
        self.top_k = int(top_k)
        self.vocab_size = vocab_size
        extra = {} if engine.max_model_len is None else {"max_model_len": engine.max_model_len}
        self.llm = LLM(model=str(model_dir), tensor_parallel_size=engine.tensor_parallel_size, dtype=engine.dtype,
                       max_logprobs=max(self.top_k, 20), logprobs_mode="raw_logprobs",
                       max_num_batched_tokens=engine.max_num_batched_tokens, enable_prefix_caching=False,
                       gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt={"image": 1}, **extra)
        # max_tokens=1: one generated token is the least vLLM accepts; only the prompt's log-probs are used.
        self.params = SamplingParams(prompt_logprobs=self.top_k, max_tokens=1, detokenize=False)

    def prompt_logprobs(self, items: Sequence[tuple[Any, Any]]) -> list[list]:
        """items: [(Tokenized, PIL image or None)] -> vLLM's ``prompt_logprobs`` per item, in order."""
        outs = self.llm.generate([vllm_prompt(tok.input_ids, image) for tok, image in items], self.params,
                                 use_tqdm=False)
        res = []
        for (tok, _), o in zip(items, outs):
            if o.prompt_logprobs is None:
                raise RuntimeError(f"sample {tok.sample_id!r}: vLLM returned no prompt log-probs")
            res.append(o.prompt_logprobs)
        return res

    def records(self, items: Sequence[tuple[Any, Any]], *, kinds: tuple[str, ...]) -> list[TeacherRecord]:
        """items: [(Tokenized, PIL image or None)] -> one TeacherRecord per item, in order (no hidden states)."""
        return [records_from_prompt_logprobs(pl, input_ids=tok.input_ids, roles=tok.roles, sample_id=tok.sample_id,
                                             row=tok.row, kinds=kinds, top_k=self.top_k, vocab_size=self.vocab_size)
                for (tok, _), pl in zip(items, self.prompt_logprobs(items))]


__all__ = ["INSTALL_HINT", "VllmTeacher", "import_vllm", "records_from_prompt_logprobs", "tail_from_head",
           "vllm_prompt", "with_hidden"]
