"""The paper's ablations on the synthetic task, over seeds, beside the direction LLaVA-KD reports.

    python bench/ablation.py --out ablation_out --seeds 3          # hours on a 2-core CPU
    python bench/ablation.py --out /tmp/abl --quick --seeds 1      # smoke test (minutes)

Rows (each a student trained from the demo's teacher and caches; the teacher is trained once
and reused from the demo's directory layout):
  schemes      PT-SFT, DPT-SFT, PT-DFT, DPT-DFT, PT-SFT-DFT, DPT-SFT-DFT, DPT-DFT-DFT, and the
               matched-budget plain baselines PT-SFT-SFT / PT-SFT-SFT-SFT
  terms        DPT-SFT-DFT without L_res, without L_vis, without L_rel, response-only
  positions    response, response+visual, response+visual+prompt
  divergences  FKL, RKL, JSD
  top-k        8, 64, V
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.config import DumpConfig, EvalConfig, LossConfig, TrainConfig  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """The demo's sizes (pipelines/demo_teacher.yaml, demo_student.yaml) as this bench uses them."""

    teacher_images: int = 6000
    qa_per_image: int = 5
    student_images: int = 1000
    num_val: int = 500
    num_eval: int = 1000
    data_seed: int = 0
    teacher_pt_epochs: float = 0.5
    teacher_sft_epochs: float = 4.0
    teacher_lr: float = 1e-3
    student_pt_epochs: float = 1.0
    student_sft_epochs: float = 3.0
    student_dft_epochs: float = 4.0
    student_lr: float = 2e-3
    pt_lr: float = 1e-3
    batch_size: int = 32


QUICK = Sizes(teacher_images=400, qa_per_image=3, student_images=100, num_val=50, num_eval=100,
              teacher_sft_epochs=2.0, student_sft_epochs=2.0, student_dft_epochs=2.0, batch_size=16)


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _train(stage, student, data, images, out, *, epochs, lr, seed, cfg: Sizes, cache=None, loss=None):
    """One stage, skipped when its DONE marker exists (each row's runs are keyed by their settings)."""
    from kdcache.train import train

    if not (Path(out) / "DONE").is_file():
        train(TrainConfig(stage=stage, student=str(student), data=str(data), images=str(images), out=str(out),
                          cache=str(cache) if cache else None, epochs=epochs, lr=lr, seed=seed,
                          batch_size=cfg.batch_size, num_workers=1, log_every=5, warmup_ratio=0.03,
                          loss=loss or LossConfig()))
    return Path(out), None

# (row, stages, loss, cache key, paper's direction)
BASE = LossConfig(alpha_res=1.0, beta_vis=1.0, gamma_rel=0.5)
SCHEMES = [
    ("PT-SFT", "pt sft", BASE, "k64", "baseline"),
    ("PT-SFT-SFT (matched)", "pt sft sft", BASE, "k64", "extra plain steps: small gain"),
    ("DPT-SFT", "dpt sft", BASE, "k64", "> PT-SFT"),
    ("PT-DFT", "pt dft", BASE, "k64", "> PT-SFT"),
    ("DPT-DFT", "dpt dft", BASE, "k64", "> PT-DFT"),
    ("PT-SFT-DFT", "pt sft dft", BASE, "k64", "> PT-SFT"),
    ("DPT-SFT-DFT", "dpt sft dft", BASE, "k64", "best scheme"),
    ("DPT-DFT-DFT", "dpt dft dft", BASE, "k64", "< DPT-SFT-DFT"),
    ("  no L_res", "dpt sft dft", replace(BASE, alpha_res=0.0), "k64", "< full"),
    ("  no L_vis", "dpt sft dft", replace(BASE, beta_vis=0.0), "k64", "< full"),
    ("  no L_rel", "dpt sft dft", replace(BASE, gamma_rel=0.0), "k64", "< full"),
    ("  response only", "dpt sft dft", replace(BASE, beta_vis=0.0, gamma_rel=0.0), "k64", "< full"),
    ("  +prompt positions", "dpt sft dft", replace(BASE, prompt_weight=1.0), "k64p", "~ full (Table 4)"),
    ("  RKL", "dpt sft dft", replace(BASE, divergence="rkl"), "k64", "~ FKL"),
    ("  JSD", "dpt sft dft", replace(BASE, divergence="jsd"), "k64", "~ FKL"),
    ("  top-8", "dpt sft dft", BASE, "k8", "<= top-64"),
    ("  top-V (exact)", "dpt sft dft", BASE, "kV", ">= top-64"),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="ablation_out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    args = ap.parse_args(argv)

    from kdcache.data.synthetic import make_synthetic
    from kdcache.dump import dump
    from kdcache.evaluate import evaluate
    from kdcache.models import init_model

    cfg: Sizes = QUICK if args.quick else Sizes()
    out = Path(args.out)
    dkey = _key({k: getattr(cfg, k) for k in ("teacher_images", "qa_per_image", "student_images",
                                               "num_val", "num_eval", "data_seed")})
    data = out / "data" / dkey
    if not (data / "tokenizer").is_dir():
        make_synthetic(data, num_images=cfg.teacher_images, qa_per_image=cfg.qa_per_image, num_val=cfg.num_val,
                       num_eval=cfg.num_eval, student_images=cfg.student_images, seed=cfg.data_seed)
    images = data / "images"
    tdir = out / "teacher"
    if not (tdir / "init" / "config.json").is_file():
        init_model(tdir / "init", preset="tiny-teacher", tokenizer=data / "tokenizer", seed=0)
    t_pt, _ = _train("pt", tdir / "init", data / "captions.json", images, tdir / "pt",
                     epochs=cfg.teacher_pt_epochs, lr=cfg.pt_lr, seed=0, cfg=cfg)
    teacher, _ = _train("sft", t_pt, data / "instruct.json", images, tdir / "sft",
                        epochs=cfg.teacher_sft_epochs, lr=cfg.teacher_lr, seed=0, cfg=cfg)
    from transformers import AutoConfig

    V = AutoConfig.from_pretrained(teacher).text_config.vocab_size
    cache_settings = {"k64": (64, ("visual", "response")), "k64p": (64, ("prompt", "visual", "response")),
                      "k8": (8, ("visual", "response")), "kV": (V, ("visual", "response"))}
    caches: dict[tuple[str, str], Path] = {}

    def cache(key: str, split: str) -> Path:
        if (key, split) not in caches:
            k, kinds = cache_settings[key]
            p = tdir / "caches" / f"{split}-{key}.zarr"
            dump(DumpConfig(teacher=str(teacher), data=str(data / f"{split}_small.json"), images=str(images),
                            out=str(p), top_k=k, positions=kinds, batch_size=32, num_workers=1))
            caches[(key, split)] = p
        return caches[(key, split)]

    rows = [r for r in SCHEMES if not args.rows or r[0].strip() in args.rows.split(",")]
    results = {}
    for name, stages, loss, ckey, direction in rows:
        accs = []
        for seed in range(args.seeds):
            rdir = out / "runs" / _key({"row": name, "stages": stages, "loss": str(loss), "c": ckey}) / f"s{seed}"
            init = rdir / "init"
            if not (init / "config.json").is_file():
                init_model(init, preset="tiny-student", tokenizer=data / "tokenizer", seed=seed)
            prev = init
            for i, st in enumerate(stages.split()):
                split = "captions" if st in ("pt", "dpt") else "instruct"
                epochs = {"pt": cfg.student_pt_epochs, "dpt": cfg.student_pt_epochs}.get(
                    st, cfg.student_sft_epochs if i == 1 else cfg.student_dft_epochs)
                lr = cfg.pt_lr if st in ("pt", "dpt") else cfg.student_lr
                prev, _ = _train(st, prev, data / f"{split}_small.json", images, rdir / f"{i}-{st}", epochs=epochs,
                                 lr=lr, seed=seed + 100 * i, cfg=cfg,
                                 cache=cache(ckey, split) if st in ("dpt", "dft") else None, loss=loss)
            rep = evaluate(EvalConfig(model=str(prev), data=str(data / "eval.json"), images=str(images),
                                      batch_size=64))
            accs.append(rep["accuracy_micro"])
        results[name] = (accs, direction)
        print(f"{name:<24} {100 * statistics.mean(accs):6.1f}  {accs}", flush=True)

    head = f"{'row':<24}{'acc %':>8}{'± sd':>7}  {'seeds':<6} paper's direction"
    lines = [head, "-" * len(head)]
    for name, (accs, direction) in results.items():
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"{name:<24}{100 * statistics.mean(accs):>8.1f}{100 * sd:>7.1f}  {len(accs):<6} {direction}")
    print("\n".join(lines))
    (out / "ablation.json").write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
