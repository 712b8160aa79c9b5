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


def plot_accuracy(table: dict[str, dict[str, tuple[float, float]]], out: str | Path,
                  title: str = "held-out accuracy (mean ± std over seeds)") -> Path:
    """table: model -> question type -> (mean, std). Grouped bars, one group per type."""
    plt = _plt()
    models = list(table)
    types = list(next(iter(table.values())).keys()) if table else []
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.3 * len(types) + 3, 3.6))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(types))]
        means = [100 * table[m][t][0] for t in types]
        stds = [100 * table[m][t][1] for t in types]
        ax.bar(xs, means, width, yerr=stds, label=m, capsize=2)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return _save(plt, fig, out)
