"""kdcache inspect: the summary, one sample's table, and one-line errors for a wrong path or id."""

from __future__ import annotations

from typer.testing import CliRunner

from kdcache.cli import app
from tests.cache.helpers import make_record, write_cache


def test_inspect_sample_and_its_errors(tmp_path):
    write_cache(tmp_path / "c", [make_record(i) for i in range(4)])
    run = CliRunner().invoke
    ok = run(app, ["inspect", str(tmp_path / "c"), "--sample", "s00002"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("sample s00002 (row 2)") and "rest" in ok.output
    for args, want in (([str(tmp_path / "nope.zarr")], "no cache at"),
                       ([str(tmp_path / "c"), "--sample", "00002"], "did you mean 's00002'")):
        r = run(app, ["inspect", *args])
        assert r.exit_code == 2, r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith("error: ") and want in last and "Traceback" not in r.output, r.output
