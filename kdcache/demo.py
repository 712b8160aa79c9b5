"""The demo: distil a tiny teacher into a tiny student on the synthetic task, honestly measured.

    kdcache demo                # the default (make demo): target <= 12 min on a 2-core CPU, teacher included
    kdcache demo --quick        # a smoke test of every stage at toy sizes (~2-3 min); no accuracy table

Everything runs through the recipe runner (``kdcache run``), inside the output directory:
``pipelines/demo_teacher.yaml`` makes the synthetic data and tokenizer, trains the teacher PT-SFT on
6,000 images and dumps its caches (once; its stamps make a rerun skip it); per seed,
``pipelines/demo_student.yaml`` trains the student on a sixth of the images:
  baseline   PT-SFT
  +SFT       the baseline given as many extra plain SFT steps as DFT adds (so extra training
             is not mistaken for distillation)
  LLaVA-KD   DPT-SFT-DFT from the caches (the teacher is never loaded while training)
  same time  the baseline given plain SFT for as long (wall time) as DFT took: the comparison
             the cached step's cost decides
             (``pipelines/demo_same_time.yaml``, epochs from the finished runs' loop times)
-> evaluate everything on the held-out split -> one table, a JSON report and PNG plots.
The recipes hold every size; ``--quick`` shrinks them through overrides (QUICK).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from .config import EvalConfig


PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
TEACHER_RECIPE, STUDENT_RECIPE, SAME_TIME_RECIPE = "demo_teacher.yaml", "demo_student.yaml", "demo_same_time.yaml"
# The sizes live in the recipes; --quick shrinks them (a smoke test: every stage runs, nothing is learnt).
QUICK = {"steps.data.num_images": 400, "steps.data.qa_per_image": 3, "steps.data.student_images": 100,
         "steps.data.num_val": 50, "steps.data.num_eval": 100, "steps.teacher.epochs": 2.0,
         "steps.sft.epochs": 2.0, "steps.sft_more.epochs": 2.0, "steps.dpt_sft.epochs": 2.0,
         "steps.dft.epochs": 2.0, "defaults.batch_size": 16, "dump_defaults.top_k": 32}
ROWS = {"baseline PT-SFT": "sft", "baseline +SFT": "sft_more", "+SFT same time": "sft_same_time", "LLaVA-KD": "dft"}
# Seed offsets per student step: the extra stages draw a different data order than the ones before.
SEED_OFFSET = {"init": 0, "pt": 0, "sft": 0, "sft_more": 100, "dpt": 0, "dpt_sft": 0, "dft": 100}


def _banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


@contextmanager
def _inside(d: Path):
    """The demo's recipes name their paths relative to the output directory: run them there."""
    old = Path.cwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def _loop_wall(run: Path) -> float:
    """A finished run's training-loop wall time (seconds), from its metrics.jsonl."""
    from .plots import read_metrics

    return float(read_metrics(run)[-1]["wall_s"])


def _steps(run: Path) -> int:
    return json.loads((run / "DONE").read_text())["steps"]


def run_demo(out: str | Path = "demo_out", *, quick: bool = False, seeds: int | None = None) -> dict:
    """Run the demo end to end through the recipe runner; returns the report (also out/report.json).

    Per seed S: ``pipelines/demo_student.yaml`` (which requires ``demo_teacher.yaml``: data, teacher,
    caches, run once) in ``students/seedS``, then ``demo_same_time.yaml`` with the epochs that give
    plain SFT DFT's wall time. The runner's stamps make a rerun skip what is done with the same settings.
    """
    from .evaluate import evaluate
    from .plots import plot_accuracy, plot_agreement, plot_losses, plot_training_curves
    from .recipes import load_recipe, run_recipe

    seeds = seeds if seeds is not None else (1 if quick else 3)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sizes = dict(QUICK) if quick else {}
    runs: dict[str, dict[int, Path]] = {k: {} for k in ROWS}
    walls: dict[str, list[float]] = {k: [] for k in ROWS}
    more_epochs = load_recipe(PIPELINES / STUDENT_RECIPE, sizes)["steps"][3]["train"]["epochs"]
    with _inside(out):
        for seed in range(seeds):
            wd = Path("students") / f"seed{seed}"
            _banner(f"seed {seed}: the teacher and its caches (once), then the students (recipe {STUDENT_RECIPE})")
            run_recipe(PIPELINES / STUDENT_RECIPE, workdir=wd, overrides={
                **sizes, **{f"steps.{n}.seed": seed + off for n, off in SEED_OFFSET.items()}})
            sd = out / wd
            # Plain SFT for as long as DFT took (loop wall times of the finished runs, so a rerun asks
            # for the same epochs and is skipped): the comparison the cached step's cost decides.
            ratio = _loop_wall(sd / "dft") / _loop_wall(sd / "sft_more")
            _banner(f"seed {seed}: baseline + plain SFT for DFT's wall time ({ratio:.2f}x the steps)")
            run_recipe(PIPELINES / SAME_TIME_RECIPE, workdir=wd, overrides={
                "models.baseline": str(wd / "sft"), "steps.sft_same_time.epochs": round(more_epochs * ratio, 3),
                "steps.sft_same_time.seed": seed + 100, **sizes})  # its requires: (seed 0's chain) are done
            for row, step in ROWS.items():
                runs[row][seed] = sd / step
            base = _loop_wall(sd / "pt") + _loop_wall(sd / "sft")
            walls["baseline PT-SFT"].append(base)
            walls["baseline +SFT"].append(base + _loop_wall(sd / "sft_more"))
            walls["+SFT same time"].append(base + _loop_wall(sd / "sft_same_time"))
            walls["LLaVA-KD"].append(sum(_loop_wall(sd / n) for n in ("dpt", "dpt_sft", "dft")))
            if seed == 0:
                t = out / "teacher"
                plot_losses({"teacher pt": t / "teacher_pt", "teacher sft": t / "teacher", "student pt": sd / "pt",
                             "student sft": sd / "sft", "student +sft": sd / "sft_more", "student dpt": sd / "dpt",
                             "student dpt-sft": sd / "dpt_sft", "student dft": sd / "dft"}, out / "losses.png")
                plot_training_curves({"PT-SFT, +SFT same steps": [sd / "pt", sd / "sft", sd / "sft_more"],
                                      "PT-SFT, +SFT same time": [sd / "pt", sd / "sft", sd / "sft_same_time"],
                                      "LLaVA-KD DPT-SFT-DFT": [sd / "dpt", sd / "dpt_sft", sd / "dft"]},
                                     out / "training_curves.png")

    # ---- evaluate ---------------------------------------------------------------------------
    _banner("evaluating on the held-out split")
    data, teacher, caches = out / "data", out / "teacher" / "teacher", out / "teacher" / "caches"
    results: dict[str, list[dict]] = {}

    def ev(model, split="eval.json", cache=None):
        return evaluate(EvalConfig(model=str(model), data=str(data / split), images=str(data / "images"),
                                   teacher_cache=str(cache) if cache else None, batch_size=256))

    results["teacher"] = [ev(teacher)]
    val = {"teacher": ev(teacher, "val.json")["accuracy_micro"]}
    for name, per_seed in runs.items():
        results[name] = [ev(m, cache=caches / "eval.zarr") for m in per_seed.values()]
        val[name] = statistics.mean(ev(m, "val.json")["accuracy_micro"] for m in per_seed.values())
    report = _table(results, walls, val)
    report["recipes"] = [str(PIPELINES / r) for r in (TEACHER_RECIPE, STUDENT_RECIPE, SAME_TIME_RECIPE)]
    report["overrides"] = sizes
    report["artefacts"] = {"out": str(out), "teacher": str(teacher), "caches": str(caches),
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
          f"{out}/losses.png; teacher {teacher}; caches under {caches}; "
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
