"""kdcache.plots: which lines the losses figure draws, and that it renders."""

from __future__ import annotations

import json

from kdcache.plots import loss_lines, plot_losses


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
