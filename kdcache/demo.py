"""The demo: distil a tiny teacher into a tiny student on the synthetic task, honestly measured.

    kdcache demo                # the default (make demo): target <= 12 min on a 2-core CPU, teacher included
    kdcache demo --quick        # a smoke test of every stage at toy sizes (~2-3 min); no accuracy table

Steps: make the synthetic data and tokenizer -> train the teacher PT-SFT on many images (reused
between runs, keyed by its settings) -> dump its caches on the student's data -> for each seed
train the student three ways on a fifth of the images:
  baseline   PT-SFT
  +SFT       the baseline given as many extra plain SFT steps as DFT adds (so extra training
             is not mistaken for distillation)
  LLaVA-KD   DPT-SFT-DFT from the caches (the teacher is never loaded while training)
  same time  the baseline given plain SFT for as long (wall time) as DFT took: the comparison
             the cached step's cost decides
-> evaluate everything on the held-out split -> one table, a JSON report and PNG plots.
Sizes and budgets below were chosen on the validation split, never on the held-out one.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .config import DumpConfig, EvalConfig, LossConfig, TrainConfig


@dataclass(frozen=True)
class DemoConfig:
    # data
    teacher_images: int = 6000
    qa_per_image: int = 5
    student_images: int = 1000
    num_val: int = 500
    num_eval: int = 1000
    data_seed: int = 0
    # teacher (tiny-teacher preset: hidden 192 x 4 layers). PT trains only the projector in front
    # of a random LLM, so most of its budget goes to SFT; lr 1e-3 (2e-3 at the width-scaled init
    # was unstable in a constant-rate check: count fell to 30% at 300 steps).
    teacher_pt_epochs: float = 0.5
    teacher_sft_epochs: float = 4.0
    teacher_lr: float = 1e-3
    # student (tiny-student preset: hidden 64 x 2 layers)
    student_pt_epochs: float = 1.0
    student_sft_epochs: float = 3.0
    student_dft_epochs: float = 4.0
    student_lr: float = 2e-3
    pt_lr: float = 1e-3
    batch_size: int = 32
    top_k: int = 64
    seeds: int = 3
    loss: LossConfig = LossConfig(alpha_res=1.0, beta_vis=1.0, gamma_rel=0.5)


QUICK = DemoConfig(teacher_images=400, qa_per_image=3, student_images=100, num_val=50, num_eval=100,
                   teacher_sft_epochs=2.0, student_sft_epochs=2.0, student_dft_epochs=2.0, top_k=32, seeds=1,
                   batch_size=16)


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


def _train(stage, student, data, images, out, *, epochs, lr, seed, cfg: DemoConfig, cache=None, loss=None):
    tc = TrainConfig(stage=stage, student=str(student), data=str(data), images=str(images), out=str(out),
                     cache=str(cache) if cache else None, epochs=epochs, lr=lr, seed=seed,
                     batch_size=cfg.batch_size, num_workers=1, log_every=5, warmup_ratio=0.03,
                     loss=loss or LossConfig())
    t0 = time.perf_counter()
    if not (Path(out) / "DONE").is_file():
        from .train import train

        train(tc)
        (Path(out) / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.2f}")
    return Path(out), float((Path(out) / "wall_s.txt").read_text())


def _steps(run: Path) -> int:
    return json.loads((run / "DONE").read_text())["steps"]


def run_demo(out: str | Path = "demo_out", *, quick: bool = False, seeds: int | None = None,
             cfg: DemoConfig | None = None) -> dict:
    """Run the demo end to end; returns the report (also written to out/report.json)."""
    from .data.synthetic import make_synthetic
    from .dump import dump
    from .evaluate import evaluate
    from .models import init_model
    from .plots import plot_accuracy, plot_agreement, plot_losses, plot_training_curves

    cfg = cfg or (QUICK if quick else DemoConfig())
    if seeds is not None:
        cfg = replace(cfg, seeds=seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # ---- data -----------------------------------------------------------------------------
    dkey = _key({k: getattr(cfg, k) for k in ("teacher_images", "qa_per_image", "student_images",
                                               "num_val", "num_eval", "data_seed")})
    data = out / "data" / dkey
    if not (data / "tokenizer").is_dir():
        _banner(f"making synthetic data -> {data}")
        make_synthetic(data, num_images=cfg.teacher_images, qa_per_image=cfg.qa_per_image, num_val=cfg.num_val,
                       num_eval=cfg.num_eval, student_images=cfg.student_images, seed=cfg.data_seed)
    images = data / "images"

    # ---- teacher (reused between runs, keyed by its settings) ------------------------------
    tkey = _key({"data": dkey, "pt": cfg.teacher_pt_epochs, "sft": cfg.teacher_sft_epochs, "lr": cfg.teacher_lr,
                 "bs": cfg.batch_size})
    tdir = out / "teacher" / tkey
    if not (tdir / "init" / "config.json").is_file():
        init_model(tdir / "init", preset="tiny-teacher", tokenizer=data / "tokenizer", seed=0)
    _banner("teacher PT-SFT (reused when already trained)")
    t_pt, w1 = _train("pt", tdir / "init", data / "captions.json", images, tdir / "pt",
                      epochs=cfg.teacher_pt_epochs, lr=cfg.pt_lr, seed=0, cfg=cfg)
    teacher, w2 = _train("sft", t_pt, data / "instruct.json", images, tdir / "sft",
                         epochs=cfg.teacher_sft_epochs, lr=cfg.teacher_lr, seed=0, cfg=cfg)

    # ---- caches ---------------------------------------------------------------------------
    _banner("dumping the teacher's caches")
    caches = {}
    for name, js in (("captions", "captions_small.json"), ("instruct", "instruct_small.json"),
                     ("eval", "eval.json")):
        caches[name] = tdir / "caches" / f"{name}-k{cfg.top_k}.zarr"
        dump(DumpConfig(teacher=str(teacher), data=str(data / js), images=str(images), out=str(caches[name]),
                        top_k=cfg.top_k, batch_size=32, num_workers=1,
                        positions=("response",) if name == "eval" else ("visual", "response")))

    # ---- students ---------------------------------------------------------------------------
    runs: dict[str, dict[int, Path]] = {"baseline PT-SFT": {}, "baseline +SFT": {}, "+SFT same time": {},
                                        "LLaVA-KD": {}}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    cap, ins = data / "captions_small.json", data / "instruct_small.json"
    for seed in range(cfg.seeds):
        sdir = out / "students" / _key({"data": dkey, "teacher": tkey, "cfg": asdict(cfg), "v": 1}) / f"seed{seed}"
        init = sdir / "init"
        if not (init / "config.json").is_file():
            init_model(init, preset="tiny-student", tokenizer=data / "tokenizer", seed=seed)
        _banner(f"seed {seed}: baseline PT-SFT")
        pt, a = _train("pt", init, cap, images, sdir / "pt", epochs=cfg.student_pt_epochs, lr=cfg.pt_lr,
                       seed=seed, cfg=cfg)
        sft, b = _train("sft", pt, ins, images, sdir / "sft", epochs=cfg.student_sft_epochs,
                        lr=cfg.student_lr, seed=seed, cfg=cfg)
        runs["baseline PT-SFT"][seed] = sft
        walls["baseline PT-SFT"].append(a + b)
        _banner(f"seed {seed}: baseline + as many plain SFT steps as DFT adds")
        more, c = _train("sft", sft, ins, images, sdir / "sft_more", epochs=cfg.student_dft_epochs,
                         lr=cfg.student_lr, seed=seed + 100, cfg=cfg)
        runs["baseline +SFT"][seed] = more
        walls["baseline +SFT"].append(a + b + c)
        _banner(f"seed {seed}: LLaVA-KD DPT-SFT-DFT from the caches")
        dpt, d = _train("dpt", init, cap, images, sdir / "dpt", epochs=cfg.student_pt_epochs, lr=cfg.pt_lr,
                        seed=seed, cfg=cfg, cache=caches["captions"], loss=cfg.loss)
        dsft, e = _train("sft", dpt, ins, images, sdir / "dpt_sft", epochs=cfg.student_sft_epochs,
                         lr=cfg.student_lr, seed=seed, cfg=cfg)
        dft, f = _train("dft", dsft, ins, images, sdir / "dft", epochs=cfg.student_dft_epochs,
                        lr=cfg.student_lr, seed=seed + 100, cfg=cfg, cache=caches["instruct"], loss=cfg.loss)
        runs["LLaVA-KD"][seed] = dft
        walls["LLaVA-KD"].append(d + e + f)
        # The same wall time as DFT spent, in plain SFT steps: what the cached step's cost decides.
        ratio = f / c
        _banner(f"seed {seed}: baseline + plain SFT for DFT's wall time ({ratio:.2f}x the steps)")
        same, g = _train("sft", sft, ins, images, sdir / "sft_same_time", epochs=cfg.student_dft_epochs * ratio,
                         lr=cfg.student_lr, seed=seed + 100, cfg=cfg)
        runs["+SFT same time"][seed] = same
        walls["+SFT same time"].append(a + b + g)
        if seed == 0:
            plot_losses({"teacher pt": t_pt, "teacher sft": teacher, "student pt": pt, "student sft": sft,
                         "student +sft": more, "student dpt": dpt, "student dpt-sft": dsft, "student dft": dft},
                        out / "losses.png")
            plot_training_curves({"PT-SFT, +SFT same steps": [pt, sft, more], "PT-SFT, +SFT same time": [pt, sft, same],
                                  "LLaVA-KD DPT-SFT-DFT": [dpt, dsft, dft]}, out / "training_curves.png")

    # ---- evaluate ---------------------------------------------------------------------------
    _banner("evaluating on the held-out split")
    results: dict[str, list[dict]] = {}

    def ev(model, split="eval.json", cache=None):
        return evaluate(EvalConfig(model=str(model), data=str(data / split), images=str(images),
                                   teacher_cache=str(cache) if cache else None, batch_size=256))

    results["teacher"] = [ev(teacher)]
    val = {"teacher": ev(teacher, "val.json")["accuracy_micro"]}
    for name, per_seed in runs.items():
        results[name] = [ev(m, cache=caches["eval"]) for m in per_seed.values()]
        val[name] = statistics.mean(ev(m, "val.json")["accuracy_micro"] for m in per_seed.values())
    report = _table(results, walls, val)
    report["config"] = asdict(cfg)
    report["artefacts"] = {"out": str(out), "teacher": str(teacher), "caches": {k: str(v) for k, v in caches.items()},
                           "students": {k: {s: str(p) for s, p in v.items()} for k, v in runs.items()}}
    report["steps"] = {k: [_steps(p) for p in v.values()] for k, v in runs.items()}
    report["wall_total_s"] = time.perf_counter() - t_start
    plot_accuracy({m: {t: [r["per_type"][t]["accuracy"] for r in rs] for t in rs[0]["per_type"]}
                   for m, rs in results.items()}, out / "accuracy.png")
    plot_agreement({m: [r["agreement"]["top1_agreement"] for r in rs] for m, rs in results.items()
                    if all(r.get("agreement") for r in rs)}, out / "agreement.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if quick:
        # The quick sizes train every stage for a few dozen steps: their accuracies are noise, not a result.
        print("\nquick demo = SMOKE TEST: every stage ran end to end at toy sizes; its accuracies are not "
              "meaningful and no accuracy table is printed. Run `kdcache demo` (no --quick) for the result.")
        print(report["smoke"])
    else:
        print("\n" + report["table"])
    print(f"\nartefacts: {out}/report.json, {out}/accuracy.png, {out}/training_curves.png, {out}/agreement.png, "
          f"{out}/losses.png; teacher {teacher}; caches under {tdir / 'caches'}; "
          f"total {report['wall_total_s'] / 60:.1f} min")
    return report


def _table(results: dict[str, list[dict]], walls: dict[str, list[float]], val: dict[str, float]) -> dict:
    types = list(results["teacher"][0]["per_type"])
    head = (f"{'model':<18}" + "".join(f"{t:>10}" for t in types)
            + f"{'avg':>14}{'val':>7}{'gap closed':>12}{'top1 agr':>10}{'KL':>8}{'train s':>9}")
    lines = [head, "-" * len(head)]
    summary = {}
    teacher = results["teacher"][0]["accuracy_micro"]
    base = [r["accuracy_micro"] for r in results.get("baseline PT-SFT", [])]
    for name, rs in results.items():
        accs = [r["accuracy_micro"] for r in rs]
        mean = statistics.mean(accs)
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        per_t = "".join(f"{100 * statistics.mean(r['per_type'][t]['accuracy'] for r in rs):>10.1f}" for t in types)
        agr = [r["agreement"] for r in rs if r.get("agreement")]
        top1 = f"{100 * statistics.mean(a['top1_agreement'] for a in agr):>10.1f}" if agr else f"{'-':>10}"
        kl = f"{statistics.mean(a['kl'] for a in agr):>8.3f}" if agr else f"{'-':>8}"
        wall = f"{statistics.mean(walls[name]):>9.0f}" if name in walls else f"{'-':>9}"
        closed = gap_closed(teacher, base, accs) if name not in ("teacher", "baseline PT-SFT") and base else None
        gap = f"{100 * statistics.mean(closed):>11.0f}%" if closed else f"{'-':>12}"
        lines.append(f"{name:<18}{per_t}{100 * mean:>8.1f} ±{100 * sd:>4.1f}{100 * val.get(name, 0):>7.1f}"
                     f"{gap}{top1}{kl}{wall}")
        summary[name] = {"accuracy": accs, "mean": mean, "std": sd, "gap_closed": closed}
    kd = [r["accuracy_micro"] for r in results.get("LLaVA-KD", [])]
    for other, key in (("baseline +SFT", "paired_diff_vs_matched_steps"),
                       ("+SFT same time", "paired_diff_vs_matched_time")):
        base = [r["accuracy_micro"] for r in results.get(other, [])]
        if kd and base:
            diffs = [100 * (a - b) for a, b in zip(kd, base)]
            lines.append(f"paired LLaVA-KD - {other} (same seeds): " + ", ".join(f"{d:+.1f}" for d in diffs)
                         + f"  (mean {statistics.mean(diffs):+.1f} points)")
            summary[key] = diffs
    lines.append("gap closed = (student - baseline PT-SFT) / (teacher - baseline PT-SFT), per seed, then averaged: "
                 "the share of the teacher's lead over the plain student that the extra training recovers")
    smoke = "training wall time per student (s): " + ", ".join(f"{n} {statistics.mean(w):.0f}" for n, w in walls.items())
    return {"table": "\n".join(lines), "summary": summary, "results": results, "smoke": smoke}


def gap_closed(teacher: float, baseline: list[float], student: list[float]) -> list[float] | None:
    """Per seed, the fraction of the teacher-baseline gap the student closes:
    (student_s - baseline_s) / (teacher - baseline_s). 1 = as good as the teacher, 0 = no better than
    the baseline, negative = worse. None when the teacher is not above every seed's baseline (no gap)."""
    if not baseline or any(teacher <= b for b in baseline):
        return None
    return [(s - b) / (teacher - b) for s, b in zip(student, baseline)]
