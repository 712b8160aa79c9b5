"""Teacher-target kinds: one small frozen class per kind of ``--targets``, and the registry of their names.

A kind owns everything the cache and the trainer need to know about it:

    parse(text)          its spelling in ``--targets`` / ``settings.targets`` (None: not this kind)
    position_targets(h)  the teacher's targets from the LM head's input (``kdcache.teacher``)
    top_k(cfg_top_k)     the columns it stores per position (``settings.top_k``)
    settings_extra(cfg)  what it adds to the cache's settings (``draw_seed`` for sampled:N)
    check_settings(...)  what the JSON Schema cannot say about its settings
    arrays(settings, D)  its per-position arrays: (name, storage dtype, width, compressor, logical dtype)
    encode(record, ...)  a ``TeacherRecord`` -> those arrays as the writer stores them, checked
    decode(parts, ...)   the stored arrays of one sample -> the ``TeacherRecord`` fields
    verify(...)          what ``kdcache verify`` checks in them
    fused_targets(...)   the fused head's keywords for a batch (``kdcache.losses.fused.head_inputs``),
                         whose target class (``kdcache.losses.targets``) is the kind's loss chunk
    train_problem(...)   a reason this kind cannot serve a training config, or None
    temperature_note()   the line the trainer prints about the KD temperature

    topk       Topk     the k most probable ids, their log-probs and the tail log-mass (LLaVA-KD, default)
    hidden     Exact    topk plus the LM head's input at every distilled position, and the LM head once
    sampled:N  Sampled  N ids drawn per position (Anshumann et al. 2025): distinct ids, counts, log-probs, tail
    topp:P[,K] Topp     per position the fewest top ids whose mass reaches P (at most K), ragged, and the tail

Array names, their axes and the checksum order are ``kdcache.cache.format``'s; a kind only says
which of them it stores, and how.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

MAX_DRAWS = 65535  # sample_counts are stored as uint16
NEG_INF = float("-inf")

# (name, storage dtype, width: None | "k" | "D", compressor key of format.CLEVEL, logical dtype or None)
ArrayRow = tuple[str, str, object, str, "str | None"]


def _topk_rows(settings: dict) -> list[ArrayRow]:
    """topk_ids, topk_logprobs, tail_logmass: the k-column arrays every kind here stores."""
    k = int(settings["top_k"])
    lp = settings["logprob_dtype"]
    return [
        ("topk_ids", "int32", k, "zstd", None),
        # float16 log-probs sorted descending are non-decreasing as uint16 bit patterns (the sign
        # bit is set and larger magnitudes have larger patterns): stored as those bits with a
        # delta filter, so zstd sees small non-negative steps. Lossless; float32 stays as is.
        ("topk_logprobs", "uint16", k, "delta-zstd", "float16") if lp == "float16"
        else ("topk_logprobs", lp, k, "byteshuffle", None),
        ("tail_logmass", "float32", None, "byteshuffle", None),
    ]


def _hidden_row(name: str, settings: dict, width: int) -> ArrayRow:
    """An array of hidden-state rows in the cache's hidden dtype (bf16 as uint16 bits)."""
    from kdcache.cache.format import HIDDEN_LOGICAL, HIDDEN_STORAGE

    h = settings["hidden"]
    # hidden states barely compress (~1.3x); zstd level 1 encodes ~2.4x faster than level 3
    return (name, HIDDEN_STORAGE[h], width, "byteshuffle-fast", HIDDEN_LOGICAL[h] if h == "bf16" else None)


def _tensor_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _encode_topk(record, where: str, P: int, k: int, lp_dtype) -> dict[str, np.ndarray]:
    """record.topk_ids / topk_logprobs / tail_logmass -> int32 [P, k], ``lp_dtype`` [P, k], float32 [P]."""
    tid = _tensor_np(record.topk_ids).astype(np.int32, copy=False)  # [P, k]
    tlp = _tensor_np(record.topk_logprobs.float()).astype(lp_dtype)  # [P, k]
    tail = _tensor_np(record.tail_logmass.float()).astype(np.float32, copy=False)  # [P]
    if tid.shape != (P, k) or tlp.shape != (P, k) or tail.shape != (P,):
        raise ValueError(
            f"{where}: expected topk_ids/topk_logprobs [P={P}, k={k}] and tail [P], got "
            f"{tuple(tid.shape)}, {tuple(tlp.shape)}, {tuple(tail.shape)}"
        )
    return {"topk_ids": tid, "topk_logprobs": tlp, "tail_logmass": tail}


def _decode_topk(parts: dict) -> dict[str, torch.Tensor]:
    return {"topk_ids": torch.from_numpy(parts["topk_ids"]),
            "topk_logprobs": torch.from_numpy(parts["topk_logprobs"]),
            "tail_logmass": torch.from_numpy(parts["tail_logmass"])}


@dataclass(frozen=True)
class Topk:
    """``topk``: the k most probable ids (sorted by log-prob), their true log-probs and the tail
    log-mass log(1 - sum p) computed as a log-sum-exp outside the ids (LLaVA-KD, the default)."""

    name: ClassVar[str] = "topk"
    form: ClassVar[str] = "topk"
    exact: ClassVar[bool] = False  # stores the LM head's input at every position (and the LM head)
    takes_top_k: ClassVar[bool] = True  # stores cfg.top_k columns (checked against the vocabulary)
    extra_axes: ClassVar[tuple[str, ...]] = ()  # ragged axes of its own (kdcache.cache.format.AXIS_INDEX)

    @property
    def spec(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str):
        return cls() if text == cls.name else None

    def position_targets(self, h, lm, *, top_k: int, temperature: float, chunk_size: int, uniforms: Callable):
        """h [P, D] the LM head's input at the distilled positions, lm the teacher's LM head ->
        (ids int [P, k], log-probs float [P, k], tail float32 [P], sample_counts int32 [P, k] | None)."""
        from kdcache.teacher import topk_from_hidden

        ids, lps, tail = topk_from_hidden(h, lm.weight, top_k, temperature=temperature, chunk_size=chunk_size,
                                          lm_bias=lm.bias)
        return ids, lps, tail, None

    def top_k(self, cfg_top_k: int) -> int:
        return int(cfg_top_k)

    def bound(self, settings: dict) -> "Topk":
        """This kind with what the cache's settings fix (``kdcache.cache.format.targets_of``)."""
        return self

    def settings_extra(self, cfg) -> dict:
        return {}

    def check_settings(self, settings: dict, where: str, error: type[Exception]) -> None:
        if "draw_seed" in settings:
            raise error(f"{where}: settings.draw_seed is only for targets sampled:N, not {settings['targets']!r}")

    def arrays(self, settings: dict, hidden_size: int) -> list[ArrayRow]:
        return _topk_rows(settings)

    def encode(self, record, where: str, P: int, ctx) -> dict[str, np.ndarray]:
        """``ctx``: the writer (k, lp_dtype, hidden_mode, hidden_size, settings)."""
        return _encode_topk(record, where, P, ctx.k, ctx.lp_dtype)

    def decode(self, parts: dict, logical: dict) -> dict[str, torch.Tensor]:
        return _decode_topk(parts)

    def verify(self, where: str, d: dict, lp_dtype: np.dtype, vocab: int, rep) -> None:
        from kdcache.cache.verify import check_id_range, check_topk_rows

        check_id_range(where, "topk_ids", d["topk_ids"], vocab, rep)
        check_topk_rows(where, d, lp_dtype, rep)

    def fused_targets(self, cat: Callable, side, cfg, device) -> dict:
        """The log-probs are at the dump's temperature T_d and the losses re-temper them by the KD
        temperature T, so they are passed as T_d * log p (= logits up to a per-row constant):
        log_softmax(T_d log p_{T_d} / T) = softmax(z / T) on the k ids whatever T_d is."""
        t_d = side.temperature
        return {"topk_ids": cat("topk_ids", torch.long), "topk_logprobs": cat("topk_logprobs", torch.float32) * t_d,
                "tail_logmass": cat("tail_logmass", torch.float32) * t_d if cfg.loss.tail else None}

    def train_problem(self, cfg, settings: dict) -> str | None:
        return None

    def temperature_note(self, t_dump: float, t_kd: float) -> str:
        if t_kd == t_dump:
            return f"KD temperature {t_kd} = the dump's: exact on the top-k ids and the tail"
        return (f"KD temperature {t_kd} != the dump's {t_dump}: exact on the top-k ids relative to each "
                "other, approximate on the tail bucket (its inner shape is not cached)")


@dataclass(frozen=True)
class Exact(Topk):
    """``hidden``: exact KD. The top-k of ``topk``, plus the teacher's final-normed hidden state H
    at every distilled position (``position_hidden`` [P, D], hidden dtype) and its LM head W once,
    so the full distribution is softmax(H W^T / T) at any T."""

    name: ClassVar[str] = "hidden"
    form: ClassVar[str] = "hidden"
    exact: ClassVar[bool] = True

    def check_settings(self, settings: dict, where: str, error: type[Exception]) -> None:
        super().check_settings(settings, where, error)
        if settings["hidden"] == "none":
            raise error(f"{where}: settings.targets 'hidden' needs hidden states, but settings.hidden "
                        "is 'none': choose bf16, fp16 or float32")

    def arrays(self, settings: dict, hidden_size: int) -> list[ArrayRow]:
        return _topk_rows(settings) + [_hidden_row("position_hidden", settings, hidden_size)]

    def encode(self, record, where: str, P: int, ctx) -> dict[str, np.ndarray]:
        """+ record.position_hidden -> stored [P, D] (bf16 as uint16 bits)."""
        from kdcache.cache.format import hidden_to_storage

        out = _encode_topk(record, where, P, ctx.k, ctx.lp_dtype)
        if record.position_hidden is None:
            raise ValueError(f"{where}: position_hidden is None but settings.targets is 'hidden'")
        h = hidden_to_storage(record.position_hidden, ctx.hidden_mode)  # [P, D]
        if h.shape != (P, ctx.hidden_size):
            raise ValueError(f"{where}: position_hidden {tuple(h.shape)} should be [P={P} positions, "
                             f"hidden_size {ctx.hidden_size}]")
        out["position_hidden"] = h
        return out

    def decode(self, parts: dict, logical: dict) -> dict[str, torch.Tensor]:
        from kdcache.cache.format import hidden_from_storage

        return {**_decode_topk(parts),
                "position_hidden": hidden_from_storage(parts["position_hidden"], logical["position_hidden"])}

    def fused_targets(self, cat: Callable, side, cfg, device) -> dict:
        """The teacher's hidden states at the positions + its LM head: the exact distribution."""
        return {"teacher_hidden": cat("position_hidden"), "teacher_lm_weight": side.lm_head.to(device)}

    def temperature_note(self, t_dump: float, t_kd: float) -> str:
        return f"targets hidden: the teacher's full distribution is rebuilt at KD temperature {t_kd} (exact)"


@dataclass(frozen=True)
class Sampled(Topk):
    """``sampled:N``: N ids drawn with replacement from softmax(z / T_d) per position (Anshumann et
    al. 2025), seeded by (draw_seed, row): the distinct ids first (sorted by log-prob), their true
    log-probs and draw counts (``sample_counts`` uint16 [P, N]; padding columns: count 0, id 0,
    log-prob -inf) and the tail outside them. Unbiased forward KL at the dump's temperature."""

    n: int = 0
    name: ClassVar[str] = "sampled"
    takes_top_k: ClassVar[bool] = False
    form: ClassVar[str] = f"sampled:N with 1 <= N <= {MAX_DRAWS}"

    @property
    def spec(self) -> str:
        return f"sampled:{self.n}"

    @classmethod
    def parse(cls, text: str):
        head, sep, tail = text.partition(":")
        if head != cls.name or not sep or not tail.isdigit() or tail != str(int(tail)):
            return None
        n = int(tail)
        if not 1 <= n <= MAX_DRAWS:
            raise ValueError(f"targets: {text!r} draws {n} ids per position ({forms()})")
        return cls(n)

    def position_targets(self, h, lm, *, top_k: int, temperature: float, chunk_size: int, uniforms: Callable):
        """N draws per position with the uniforms of ``sample_uniforms`` (one stream per sample)."""
        from kdcache.teacher import sample_from_hidden

        ids, lps, tail, counts = sample_from_hidden(h, lm.weight, self.n, uniforms=uniforms(self.n),
                                                    temperature=temperature, chunk_size=chunk_size, lm_bias=lm.bias)
        return ids, lps, tail, counts.to(torch.int32)

    def top_k(self, cfg_top_k: int) -> int:
        return self.n  # N columns; the config's top_k is not used

    def settings_extra(self, cfg) -> dict:
        return {"draw_seed": int(cfg.draw_seed)}

    def check_settings(self, settings: dict, where: str, error: type[Exception]) -> None:
        if int(settings["top_k"]) != self.n:
            raise error(f"{where}: settings.top_k is {settings['top_k']} but targets "
                        f"{settings['targets']!r} stores {self.n} columns: top_k must equal N")
        if "draw_seed" not in settings:
            raise error(f"{where}: settings.draw_seed is missing (targets {settings['targets']!r} "
                        "records the seed of its draws)")

    def arrays(self, settings: dict, hidden_size: int) -> list[ArrayRow]:
        return _topk_rows(settings) + [("sample_counts", "uint16", int(settings["top_k"]), "bitshuffle", None)]

    def encode(self, record, where: str, P: int, ctx) -> dict[str, np.ndarray]:
        """+ record.sample_counts -> uint16 [P, N], checked: 0 <= count, sum per position = N."""
        out = _encode_topk(record, where, P, ctx.k, ctx.lp_dtype)
        if record.sample_counts is None:
            raise ValueError(f"{where}: sample_counts is None but settings.targets is {self.spec!r}")
        c = _tensor_np(record.sample_counts).astype(np.int64)  # [P, N]
        if c.shape != (P, ctx.k):
            raise ValueError(f"{where}: sample_counts {tuple(c.shape)} should be [P={P}, N={ctx.k}]")
        if P and (c.min() < 0 or (c.sum(axis=1) != self.n).any()):
            raise ValueError(f"{where}: sample_counts must be >= 0 and sum to N={self.n} at every "
                             "position (draws per distinct id)")
        out["sample_counts"] = c.astype(np.uint16)
        return out

    def decode(self, parts: dict, logical: dict) -> dict[str, torch.Tensor]:
        # uint16 on disk; int32 like topk_ids (torch's uint16 lacks most ops)
        return {**_decode_topk(parts), "sample_counts": torch.from_numpy(parts["sample_counts"].astype(np.int32))}

    def verify(self, where: str, d: dict, lp_dtype: np.dtype, vocab: int, rep) -> None:
        from kdcache.cache.verify import check_id_range, check_sampled_rows

        check_id_range(where, "topk_ids", d["topk_ids"], vocab, rep)
        check_sampled_rows(where, d, lp_dtype, self.n, rep)

    def fused_targets(self, cat: Callable, side, cfg, device) -> dict:
        """The drawn ids, their log-probs and counts (the unbiased forward-KL estimator; the draws
        are from the dump's temperature, which must equal T: ``train_problem``)."""
        return {"topk_ids": cat("topk_ids", torch.long), "topk_logprobs": cat("topk_logprobs", torch.float32),
                "sample_counts": cat("sample_counts", torch.long)}

    def train_problem(self, cfg, settings: dict) -> str | None:
        lc = cfg.loss
        if lc.divergence != "fkl":
            return (f"cache {cfg.cache} has sampled targets ({self.spec}), whose unbiased loss exists for "
                    f"forward KL only; this run asks loss.divergence {lc.divergence!r}: set "
                    "loss.divergence: fkl, or dump with --targets topk / hidden")
        if lc.kd_temperature != float(settings["temperature"]):
            t = settings["temperature"]
            return (f"cache {cfg.cache} drew its samples at temperature {t}, this run "
                    f"asks loss.kd_temperature {lc.kd_temperature}: draws cannot be re-tempered without "
                    f"bias; set loss.kd_temperature: {t} or dump with --temperature {lc.kd_temperature}")
        return None

    def temperature_note(self, t_dump: float, t_kd: float) -> str:
        return f"targets {self.spec}: unbiased forward KL from draws at temperature {t_dump} = the KD temperature"


TOPP_MAX_K = 65535  # topp_counts are stored as uint16


@dataclass(frozen=True)
class Topp(Topk):
    """``topp:P[,K]``: a nucleus per position. The teacher's ids sorted by probability are kept
    while the mass before them is below P (the fewest ids whose mass reaches P), at most K (the
    cache's top_k; K omitted: ``--top-k``), and the tail is the exact log-mass outside the kept
    ids (a log-sum-exp, never log(1 - sum p)). P = 1 keeps all K (no rounded cumulative sum
    decides). Megatron-LM's ``--logits-save-top-p`` keeps logits for the same reason: a peaked
    position needs a few ids, a flat one many.

    Stored ragged: ``topp_counts`` uint16 [P] ids per position, ``topp_ids`` int32 [E] and
    ``topp_logprobs`` [E] flat over the part's positions (E = sum of the counts; index columns
    ``entry_offset`` / ``num_entries``), ``tail_logmass`` float32 [P]. Records (and the losses)
    see it padded to K: ``topk_ids`` [P, K] whose padding columns repeat the position's first id,
    ``topk_logprobs`` [P, K] -inf there; the k+1-bucket losses take ``topk_mask`` = finite
    log-prob and apply unchanged (equal to the full KL at P = 1, K = V).
    """

    p: float = 1.0
    k: int | None = None
    name: ClassVar[str] = "topp"
    form: ClassVar[str] = "topp:P[,K] with 0 < P <= 1, 1 <= K <= 65535"
    extra_axes: ClassVar[tuple[str, ...]] = ("entries",)

    @property
    def spec(self) -> str:
        return f"topp:{self.p!r}" + ("" if self.k is None else f",{self.k}")

    @classmethod
    def parse(cls, text: str):
        head, sep, tail = text.partition(":")
        if head != cls.name or not sep:
            return None
        p_text, comma, k_text = tail.partition(",")
        try:
            p = float(p_text)
        except ValueError:
            p = float("nan")
        if not (0.0 < p <= 1.0) or (comma and not (k_text.isdigit() and k_text == str(int(k_text)))):
            raise ValueError(f"targets: {text!r} is not a nucleus target ({forms()})")
        k = int(k_text) if comma else None
        if k is not None and not 1 <= k <= TOPP_MAX_K:
            raise ValueError(f"targets: {text!r} keeps at most {k} ids per position ({forms()})")
        return cls(p, k)

    def top_k(self, cfg_top_k: int) -> int:
        return int(cfg_top_k if self.k is None else self.k)

    def bound(self, settings: dict) -> "Topp":
        """K from ``settings.top_k`` when the spelling left it out."""
        return self if self.k is not None else dataclasses.replace(self, k=int(settings["top_k"]))

    def check_settings(self, settings: dict, where: str, error: type[Exception]) -> None:
        super().check_settings(settings, where, error)
        if self.k is not None and int(settings["top_k"]) != self.k:
            raise error(f"{where}: settings.top_k is {settings['top_k']} but targets {settings['targets']!r} "
                        f"keeps at most {self.k} ids: top_k must equal K")

    def position_targets(self, h, lm, *, top_k: int, temperature: float, chunk_size: int, uniforms: Callable):
        """The top K (``topk_from_hidden``), then per position the ids while the mass before them
        is < P; the dropped ids' mass joins the tail: logaddexp(tail_K, logsumexp(dropped))."""
        from kdcache.teacher import topk_from_hidden

        ids, lps, tail = topk_from_hidden(h, lm.weight, top_k, temperature=temperature, chunk_size=chunk_size,
                                          lm_bias=lm.bias)  # [P, K] sorted descending, [P]
        if self.p >= 1.0:
            return ids, lps, tail, None
        p = lps.float().exp()
        keep = (torch.cumsum(p, dim=1) - p) < self.p  # [P, K] mass before each id < P; the first always
        dropped = torch.logsumexp(lps.float().masked_fill(keep, NEG_INF), dim=1)  # [P] -inf when none
        tail = torch.logaddexp(tail.float(), dropped)
        return torch.where(keep, ids, ids[:, :1]), lps.masked_fill(~keep, NEG_INF), tail, None

    def arrays(self, settings: dict, hidden_size: int) -> list[ArrayRow]:
        lp = settings["logprob_dtype"]
        return [
            ("tail_logmass", "float32", None, "byteshuffle", None),
            ("topp_counts", "uint16", None, "bitshuffle", None),
            ("topp_ids", "int32", None, "zstd", None),
            # sorted within each position, as topk_logprobs: float16 as delta-coded bits
            ("topp_logprobs", "uint16", None, "delta-zstd", "float16") if lp == "float16"
            else ("topp_logprobs", lp, None, "byteshuffle", None),
        ]

    def encode(self, record, where: str, P: int, ctx) -> dict[str, np.ndarray]:
        """record.topk_ids / topk_logprobs [P, K] (padding: log-prob -inf, after the kept ids) ->
        the ragged arrays; every position keeps at least one id."""
        top = _encode_topk(record, where, P, ctx.k, ctx.lp_dtype)
        kept = np.isfinite(_tensor_np(record.topk_logprobs.float()))  # [P, K]
        counts = kept.sum(axis=1)  # [P]
        if P and (counts.min() < 1 or (kept[:, 1:] & ~kept[:, :-1]).any()):
            raise ValueError(f"{where}: targets {self.spec!r} keeps the first ids of each position (at least one) "
                             "and pads after them with log-prob -inf; these records do not")
        return {"tail_logmass": top["tail_logmass"], "topp_counts": counts.astype(np.uint16),
                "topp_ids": top["topk_ids"][kept], "topp_logprobs": top["topk_logprobs"][kept]}

    @staticmethod
    def padded(d: dict, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sample's ragged arrays -> (ids int32 [P, k] padding repeating the first id,
        log-probs [P, k] -inf padding, kept bool [P, k]). ValueError if the counts do not match."""
        counts = d["topp_counts"].astype(np.int64)  # [P]
        kept = np.arange(k)[None, :] < counts[:, None]  # [P, k]
        if int(counts.sum()) != len(d["topp_ids"]) or len(d["topp_ids"]) != len(d["topp_logprobs"]):
            raise ValueError(f"topp_counts sum to {int(counts.sum())} but topp_ids / topp_logprobs hold "
                             f"{len(d['topp_ids'])} / {len(d['topp_logprobs'])} entries")
        if len(counts) and (counts.min() < 1 or counts.max() > k):
            raise ValueError(f"topp_counts must lie in [1, {k}] (got {int(counts.min())}..{int(counts.max())})")
        ids = np.zeros(kept.shape, dtype=np.int32)
        ids[kept] = d["topp_ids"]
        ids = np.where(kept, ids, ids[:, :1]) if len(counts) else ids
        lps = np.full(kept.shape, -np.inf, dtype=d["topp_logprobs"].dtype)
        lps[kept] = d["topp_logprobs"]
        return ids, lps, kept

    def decode(self, parts: dict, logical: dict) -> dict[str, torch.Tensor]:
        ids, lps, _ = self.padded(parts, self.k)
        return {"topk_ids": torch.from_numpy(ids), "topk_logprobs": torch.from_numpy(lps),
                "tail_logmass": torch.from_numpy(parts["tail_logmass"])}

    def verify(self, where: str, d: dict, lp_dtype: np.dtype, vocab: int, rep) -> None:
        """The counts match the entries and lie in [1, K]; ids in the vocabulary and distinct per
        position; log-probs finite, <= 0, sorted descending; the kept mass plus the tail is 1; and the
        kept mass reaches P (within the stored dtype's rounding) wherever fewer than K are kept."""
        from kdcache.cache.verify import check_id_range, check_mass

        check_id_range(where, "topp_ids", d["topp_ids"], vocab, rep)
        k = self.k
        try:
            ids, lps, kept = self.padded(d, k)
        except ValueError as e:
            rep.add(f"{where}: {e}")
            return
        if not np.isfinite(d["topp_logprobs"].astype(np.float64)).all():
            rep.add(f"{where}: array topp_logprobs has non-finite values")
            return
        srt = np.sort(np.where(kept, ids, -1 - np.arange(k)), axis=1)
        if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
            rep.add(f"{where}: array topp_ids repeats an id at one position (ids must be distinct)")
        lp = lps.astype(np.float64)
        tol_lp = 2 * float(np.finfo(lp_dtype).eps)
        both = kept[:, 1:] & kept[:, :-1]
        lp0 = np.where(kept, lp, 0.0)
        if (lp0 > tol_lp).any():
            rep.add(f"{where}: array topp_logprobs has log-probs > 0 (max {lp0.max():.4g})")
        if (both & (np.diff(lp0, axis=1) > tol_lp * np.maximum(1, np.abs(lp0[:, 1:])))).any():
            rep.add(f"{where}: array topp_logprobs is not sorted descending within a position")
        tail = d["tail_logmass"].astype(np.float64)
        if np.isnan(tail).any() or (tail == np.inf).any() or (tail > 1e-6).any():
            rep.add(f"{where}: array tail_logmass has NaN, +inf or values > 0")
            return
        prob = np.where(kept, np.exp(lp0), 0.0)
        check_mass(where, d, prob, lp0, tail, lp_dtype, rep)
        short = kept.sum(axis=1) < k  # [P] stopped before the cap: the kept mass must reach P
        mass = prob.sum(axis=1)
        slack = 2.0 * float(np.finfo(lp_dtype).eps) * np.sum(prob * np.abs(lp0), axis=1) + 1e-4
        bad = np.nonzero(short & (mass < self.p - slack))[0]
        if self.p < 1.0 and len(bad):
            j = int(bad[0])
            rep.add(f"{where}: position {int(d['positions'][j])} keeps mass {mass[j]:.6f} < P = {self.p} with "
                    f"{int(kept[j].sum())} < K = {k} ids (and {len(bad) - 1} more)")

    def fused_targets(self, cat: Callable, side, cfg, device) -> dict:
        """As ``Topk``, plus ``topk_mask``: the kept columns (finite log-prob)."""
        lp = cat("topk_logprobs", torch.float32)
        t_d = side.temperature
        return {"topk_ids": cat("topk_ids", torch.long), "topk_logprobs": lp * t_d,
                "tail_logmass": cat("tail_logmass", torch.float32) * t_d if cfg.loss.tail else None,
                "topk_mask": torch.isfinite(lp)}

    def temperature_note(self, t_dump: float, t_kd: float) -> str:
        return f"targets {self.spec}: " + super().temperature_note(t_dump, t_kd)


TARGET_KINDS: dict[str, type[Topk]] = {k.name: k for k in (Topk, Exact, Sampled, Topp)}


def forms() -> str:
    return "accepted: " + ", ".join(k.form for k in TARGET_KINDS.values())


def parse_targets(targets: str) -> Topk:
    """``"topk"`` -> Topk(), ``"hidden"`` -> Exact(), ``"sampled:8"`` -> Sampled(8), ...

    Raises ValueError (TypeError for a non-string) naming the accepted forms.
    """
    if not isinstance(targets, str):
        raise TypeError(f"targets: {targets!r} is not a string ({forms()})")
    for kind in TARGET_KINDS.values():
        parsed = kind.parse(targets)
        if parsed is not None:
            return parsed
    raise ValueError(f"targets: {targets!r} is not a target mode ({forms()})")
