"""kdcache.plots: which lines the losses figure draws, and that it renders."""

from __future__ import annotations

import json

from kdcache.plots import loss_lines, plot_agreement, plot_losses, plot_training_curves, stage_curve


def _metrics(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_loss_lines_show_reg_when_it_is_the_total_and_start_at_step_1(tmp_path):
    sft = [{"step": s, "loss/reg": 3.0 / s, "loss/total": 3.0 / s * (1 + 1e-8)} for s in (1, 10, 20)]  # rounding
    dft = [{"step": s, "loss/reg": 2.0 / s, "loss/res": 1.0 / s, "loss/total": 3.0 / s} for s in (1, 10)]
    assert [(lab, xs, total) for lab, xs, _ys, total in loss_lines(sft)] == [("reg = total", [1, 10, 20], False)]
    got = loss_lines(dft)
    assert [(lab, total) for lab, _x, _y, total in got] == [("total", True), ("reg", False), ("res", False)]
    assert got[0][2] == [3.0, 0.3]
    out = plot_losses({"sft": _metrics(tmp_path, "sft", sft), "dft": _metrics(tmp_path, "dft", dft)},
                      tmp_path / "losses.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_student_curve_continues_steps_and_time_across_stages(tmp_path):
    pt = [{"step": s, "loss/reg": 5.0 / s, "wall_s": 0.5 * s} for s in (5, 10)]
    sft = [{"step": s, "loss/reg": 1.0 / s, "loss/total": 1.0 / s, "wall_s": 2.0 * s} for s in (5, 10)]
    xs, ts, ys = stage_curve([pt, sft], "loss/reg")
    assert xs == [5, 10, 15, 20] and ts == [2.5, 5.0, 15.0, 25.0] and ys == [1.0, 0.5, 0.2, 0.1]
    out = plot_training_curves({"a": [_metrics(tmp_path, "pt", pt), _metrics(tmp_path, "sft", sft)]},
                               tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    out = plot_agreement({"baseline": [0.6, 0.7], "LLaVA-KD": [0.8, 0.9]}, tmp_path / "agreement.png")
    assert out.stat().st_size > 5000
