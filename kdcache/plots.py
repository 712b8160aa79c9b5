"""PNG plots: loss terms per stage (from metrics.jsonl) and accuracy bars per question type."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def loss_lines(metrics: list[dict]) -> list[tuple[str, list[int], list[float], bool]]:
    """(label, steps, values, is_total) per loss term of one run's metrics.jsonl rows. ``total``
    comes first (drawn under the terms); where it equals ``reg`` at every step (a stage that does
    not distil) there is one line, ``reg = total``, instead of two on top of each other."""
    terms = sorted({k for r in metrics for k in r if k.startswith("loss/")} - {"loss/total"})
    # equal up to float rounding (total is formed from the terms on the device): one line
    same = all("loss/reg" in r and abs(r["loss/total"] - r["loss/reg"]) <= 1e-6 * max(1.0, abs(r["loss/reg"]))
               for r in metrics if "loss/total" in r)
    lines = []
    if not same:
        pts = [(r["step"], r["loss/total"]) for r in metrics if "loss/total" in r]
        lines.append(("total", [p[0] for p in pts], [p[1] for p in pts], True))
    for t in terms:
        pts = [(r["step"], r[t]) for r in metrics if t in r]
        lines.append(("reg = total" if same and t == "loss/reg" else t[5:], [p[0] for p in pts],
                      [p[1] for p in pts], False))
    return lines


def plot_losses(runs: dict[str, str | Path], out: str | Path, title: str = "loss terms per stage") -> Path:
    """One panel per run (stage), one line per loss term over optimizer steps (integer ticks).
    ``total`` is a thick grey line under the terms; where it equals ``reg`` (stages that do not
    distil) one line says ``reg = total``."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    runs = {k: v for k, v in runs.items() if read_metrics(v)}
    n = max(1, len(runs))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, d) in zip(axes.flat, runs.items()):
        m = read_metrics(d)
        for label, xs, ys, total in loss_lines(m):
            if total:
                ax.plot(xs, ys, label=label, lw=3.0, color="0.6", zorder=1)
            else:
                ax.plot(xs, ys, label=label, lw=1.2, zorder=2, marker="." if len(xs) < 12 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(plt, fig, out)


def plot_accuracy(table: dict[str, dict[str, list[float]]], out: str | Path,
                  title: str = "held-out accuracy per question type (bars: mean over seeds, dots: each seed)") -> Path:
    """table: model -> question type -> one accuracy (0..1) per seed. Grouped bars (mean), one
    group per type, with every seed's value as a dot on its bar and the seed spread as an error bar."""
    import statistics

    plt = _plt()
    models = list(table)
    types = list(next(iter(table.values())).keys()) if table else []
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.5 * len(types) + 3, 3.8))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(types))]
        vals = [[100 * v for v in table[m][t]] for t in types]
        means = [statistics.mean(v) for v in vals]
        stds = [statistics.pstdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(xs, means, width, yerr=stds, label=m, capsize=2)
        for x, v in zip(xs, vals):
            if len(v) > 1:
                ax.plot([x] * len(v), v, "o", ms=2.5, color="black", alpha=0.6, zorder=3)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=min(3, len(models)))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, out)


def stage_curve(stages: list[list[dict]], term: str) -> tuple[list[int], list[float], list[float]]:
    """One student's ``term`` over its stages in order (each a metrics.jsonl as rows): optimizer steps
    and training wall time continue where the previous stage ended. -> (steps, wall_s, values)."""
    xs, ts, ys = [], [], []
    s0, t0 = 0, 0.0
    for m in stages:
        m = [r for r in m if term in r]
        xs += [s0 + r["step"] for r in m]
        ts += [t0 + r["wall_s"] for r in m]
        ys += [r[term] for r in m]
        if m:
            s0, t0 = xs[-1], ts[-1]
    return xs, ts, ys


def plot_training_curves(runs: dict[str, list[str | Path]], out: str | Path, term: str = "loss/reg",
                         title: str = "student training loss (response cross-entropy), seed 0") -> Path:
    """runs: label -> the run directories of one student in order (its stages, e.g. PT, SFT, DFT).
    Two panels: ``term`` against optimizer steps and against training wall time, each stage
    continuing where the previous one ended, so equal-steps and equal-time comparisons read off
    the x axis. Runs need ``step`` and ``wall_s`` in their metrics.jsonl."""
    plt = _plt()
    fig, (a_step, a_time) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, dirs in runs.items():
        xs, ts, ys = stage_curve([read_metrics(d) for d in dirs], term)
        a_step.plot(xs, ys, lw=1.2, label=label)
        a_time.plot(ts, ys, lw=1.2, label=label)
    for ax, xl in ((a_step, "optimizer steps (all stages)"), (a_time, "training wall time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(term.split("/")[-1])
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, out)


def plot_agreement(table: dict[str, list[float]], out: str | Path,
                   title: str = "teacher-student top-1 agreement on held-out answers") -> Path:
    """table: model -> top-1 agreement (0..1) per seed. One bar per model (mean), seeds as dots."""
    import statistics

    plt = _plt()
    models = list(table)
    fig, ax = plt.subplots(figsize=(1.4 * len(models) + 2, 3.4))
    means = [100 * statistics.mean(table[m]) for m in models]
    ax.bar(range(len(models)), means, 0.6, color="tab:purple", alpha=0.8)
    for i, m in enumerate(models):
        ax.plot([i] * len(table[m]), [100 * v for v in table[m]], "o", ms=3, color="black")
        ax.text(i, means[i] + 1, f"{means[i]:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_ylabel("top-1 agreement (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, out)
