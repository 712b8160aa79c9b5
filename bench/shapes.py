"""The real-shape models on the meta device: parameters, tokens, FLOPs and memory, no GPU needed.

    python bench/shapes.py                 # ~5 s on a CPU: the figures the GPU tables are read against

Builds the student (SigLIP-so400m/14@384 + Qwen2.5-0.5B) and the teacher (the same tower +
Qwen2.5-3B) exactly as the benchmarks do (``LlavaForConditionalGeneration._from_config`` of
``kdcache.models.llava_config``), but on the meta device: no weights, no time. It checks what a
shape bug would break on the GPU (729 visual tokens from the tower's position table, the
vocabulary, tied heads) and gives per sample of 729 visual + 128 text tokens:

- parameters per part (vision tower, projector, LLM body, embeddings, LM head);
- forward FLOPs (2 x parameters per token, causal attention 2 L T^2 d, the LM head at the
  positions that need it), for the dump (teacher forward, LM head at the distilled positions)
  and for the DFT step (student forward + backward of the trainable part: x3, the frozen tower x1);
- memory the GPU tables will show: AdamW with fp32 master weights (16 bytes per trainable
  parameter), full-vocabulary logits of a batch (the naive paths), bf16 teacher weights.
"""

from __future__ import annotations

import argparse
import time

import torch

import _report
from kdcache.models import QWEN_SHAPES, SIGLIP_SO400M, llava_config

TEXT_TOKENS, RESPONSE_TOKENS = 128, 96  # per sample, as train_step.py and dump.py build them
STUDENT_BATCH, DUMP_BATCH = 8, 16


def build_meta(llm: str):
    from transformers import LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    tc = Qwen2Config(**QWEN_SHAPES[llm])
    vc = SiglipVisionConfig(**SIGLIP_SO400M)
    cfg = llava_config(tc, vc, tc.vocab_size - 1)
    with torch.device("meta"):
        return LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)


def parts(model) -> dict[str, int]:
    """Parameter counts by part; a tied LM head counts once (under embeddings)."""
    lm = model.model.language_model
    emb = lm.embed_tokens.weight
    tied = model.lm_head.weight is emb
    return {"vision tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
            "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
            "LLM body": sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n),
            "embeddings": emb.numel(), "LM head (untied)": 0 if tied else model.lm_head.weight.numel()}


def forward_flops(model, T: int, head_positions: int) -> float:
    """Forward FLOPs of one sample (``bench/dump.py``'s ``sample_flops`` for one unpadded sample)."""
    p = parts(model)
    cfg = model.config.text_config
    v = model.config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    n_vis = patches
    V, D = model.lm_head.weight.shape
    return (2 * p["LLM body"] * T + 2 * cfg.num_hidden_layers * T * T * cfg.hidden_size
            + 2 * p["vision tower"] * patches + 2 * p["projector"] * n_vis + 2 * V * D * head_positions)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default="qwen2.5-0.5b", choices=list(QWEN_SHAPES))
    ap.add_argument("--teacher", default="qwen2.5-3b", choices=list(QWEN_SHAPES))
    _report.add_args(ap)
    args = ap.parse_args(argv)
    rep = _report.Report(args, "shapes", planned=["student", "teacher"])
    t = time.perf_counter()
    models = {"student": build_meta(args.student), "teacher": build_meta(args.teacher)}
    build_s = time.perf_counter() - t
    checks = []
    cells = []
    for role, m in models.items():
        v = m.config.vision_config
        n_vis = (v.image_size // v.patch_size) ** 2
        # the tower's learned position table: one row per patch, whatever the module nesting
        table_rows = next(mod.weight.shape[0] for name, mod in m.model.vision_tower.named_modules()
                          if name.endswith("position_embedding"))
        T = n_vis + TEXT_TOKENS
        V, D = m.lm_head.weight.shape
        p = parts(m)
        distilled = n_vis + RESPONSE_TOKENS  # visual + response positions
        f_dump = forward_flops(m, T, distilled)
        # DFT step: trainable LLM + projector forward and backward (x3), frozen tower forward (x1)
        f_step = 3 * (forward_flops(m, T, distilled) - 2 * p["vision tower"] * n_vis) + 2 * p["vision tower"] * n_vis
        trainable = p["projector"] + p["LLM body"] + p["embeddings"] + p["LM head (untied)"]
        row = {"role": role, "llm": args.student if role == "student" else args.teacher, "visual_tokens": n_vis,
               "position_table": table_rows, "tokens": T, "V": V, "D": D,
               "tied": p["LM head (untied)"] == 0, **{f"params {k}": x for k, x in p.items()},
               "params total": sum(p.values()), "dump GFLOP/sample": f_dump / 1e9,
               "DFT step GFLOP/sample": f_step / 1e9,
               "AdamW fp32 GiB": 16 * trainable / 2**30,
               "bf16 weights GiB": 2 * sum(p.values()) / 2**30,
               "student-batch fp32 logits GiB": STUDENT_BATCH * T * V * 4 / 2**30,
               "dump-batch fp32 logits GiB": DUMP_BATCH * T * V * 4 / 2**30}
        rep.row(row)
        checks.append(n_vis == 729 and table_rows == 729 and V == 151936)
        cells.append([role, row["llm"], f"{p['vision tower'] / 1e6:.0f}M", f"{p['projector'] / 1e6:.1f}M",
                      f"{p['LLM body'] / 1e6:.0f}M", f"{p['embeddings'] / 1e6:.0f}M",
                      "tied" if row["tied"] else f"{p['LM head (untied)'] / 1e6:.0f}M",
                      f"{sum(p.values()) / 1e9:.3f}B", f"{n_vis} ({table_rows})", str(T),
                      f"{row['dump GFLOP/sample']:.0f}" if role == "teacher" else "-",
                      f"{row['DFT step GFLOP/sample']:.0f}" if role == "student" else "-",
                      f"{row['AdamW fp32 GiB']:.1f}" if role == "student" else "-", f"{row['bf16 weights GiB']:.2f}",
                      f"{row['student-batch fp32 logits GiB']:.1f} / {row['dump-batch fp32 logits GiB']:.1f}"])
    md = (f"real shapes on the meta device (built in {build_s:.1f} s): SigLIP-so400m/14@384 + Qwen2.5, "
          f"{TEXT_TOKENS} text tokens of which {RESPONSE_TOKENS} response; FLOPs forward = 2 x params x tokens "
          f"+ causal attention + LM head at the distilled positions\n\n"
          + _report.md_table(["model", "LLM", "vision", "projector", "LLM body", "embeddings", "LM head", "total",
                              "visual tokens (pos. table)", "tokens", "dump GFLOP/sample", "DFT step GFLOP/sample",
                              "AdamW fp32 GiB", "bf16 weights GiB",
                              f"fp32 logits GiB (batch {STUDENT_BATCH} / {DUMP_BATCH})"], cells))
    summary = [f"shapes: 729 visual tokens, V = 151936 in both models: {_report.verdict(all(checks))}"]
    rep.render(md, summary)
    print("\n" + md + "\n" + "\n".join(summary))
    rep.finish()


if __name__ == "__main__":
    main()
