"""The README's command block and every ``--help`` example run verbatim, in order, on the synthetic
data in a temporary directory, so a new user's first path cannot rot (issue 21).

Small sizes, by documented substitution only (the README says so under the block): ``make-data``
gets ``--num-images 24 --student-images 12 --num-val 4 --num-eval 16``, ``train`` gets
``--max-steps 2 --batch-size 4`` and ``run`` the same sizes as ``--set`` overrides (a repeated
flag's last value wins). A line whose comment says "needs the hub" (or that assembles a
pretrained ``--llm``) must fail with one clean error
line (there is no network here), as must ``--backend vllm`` examples (vLLM is not installed), with
the install hint. Every other command must exit 0, print no traceback, and leave the result it
implies (a model directory, a cache holding samples, a Parquet file with rows, a report that
scored samples). Then the README's Python snippets run as shown on what the commands made.
``kdcache demo --quick`` is run by tests/test_demo.py, so it is not repeated here.
A help example identical to a README line already run is not run twice.

Commands run in this process through the real typer app (``CliRunner``): one import of torch and
transformers for ~35 commands keeps the test within about two minutes on two cores.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cli import app

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "make-data": ["--num-images", "24", "--student-images", "12", "--num-val", "4", "--num-eval", "16"],
    "train": ["--max-steps", "2", "--batch-size", "4"],
    "run": ["--set", "defaults.max_steps=2", "--set", "defaults.batch_size=4", "--set", "steps.data.num_images=24",
            "--set", "steps.data.student_images=12", "--set", "steps.data.num_val=4",
            "--set", "steps.data.num_eval=16"],
}
SKIP = {"demo"}  # tests/test_demo.py runs `kdcache demo --quick`


def readme_commands() -> list[tuple[str, bool]]:
    """(command line, needs the hub) of the README's "The commands" block, continuations joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## The commands\n.*?```bash\n(.*?)```", text, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            out.append((" ".join(line.split("  #")[0].split()), "needs the hub" in line))
    return out


def help_examples() -> list[str]:
    """Every ``kdcache ...`` example of the top-level help and of each command's docstring."""
    found = [re.sub(r"\s{2,}\(.*\)\s*$", "", m.group(1)).strip()
             for m in re.finditer(r"^\s+(kdcache .+)$", app.info.help, re.M)]
    for cmd in app.registered_commands:
        doc = cmd.callback.__doc__ or ""
        for block in re.findall(r"Examples?:(.*?)(?:\n\s*\n|$)", doc, re.S):
            found += [" ".join(("kdcache " + c).split()) for c in re.split(r"\bkdcache ", block)[1:]]
    return found


def _expect_result(argv: list[str], output: str) -> None:
    """The result the command implies, beyond its exit code."""
    def opt(name):
        return argv[argv.index(name) + 1] if name in argv else None

    cmd, out = argv[0], opt("--out")
    if cmd == "make-data":
        assert (Path(out) / "instruct.json").is_file() and (Path(out) / "synthetic.json").is_file()
    elif cmd == "init-model" or cmd == "train":
        assert (Path(out) / "config.json").is_file() and list(Path(out).glob("*.safetensors")), out
    elif cmd == "dump":
        from kdcache.cache.reader import CacheReader

        assert CacheReader(out).num_samples > 0, out
    elif cmd == "export":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(opt("--parquet")).metadata.num_rows > 0
    elif cmd == "eval":
        assert json.loads(Path(out).read_text())["num_samples"] > 0
    elif cmd == "generate":
        assert json.loads(Path(out).read_text())
    elif cmd == "forward":
        assert "loss" in output
    elif cmd == "verify":
        assert ": OK" in output and re.search(r"\b[1-9]\d* samples checked", output), output
    elif cmd == "inspect":
        assert len(output.splitlines()) > 3, output
    elif cmd == "run":
        assert "[llava_kd] eval" in output


@pytest.mark.readme
def test_readme_and_help_examples_run_verbatim(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    done: set[str] = set()
    readme = readme_commands()
    assert len(readme) >= 15 and readme[0][0].startswith("kdcache make-data")
    todo = [(c, hub, "README") for c, hub in readme] + [(c, False, "--help") for c in help_examples()]
    for line, needs_hub, where in todo:
        words = shlex.split(line)
        assert words[0] == "kdcache", (where, line)
        argv = words[1:]
        if argv[0] in SKIP or line in done:
            continue
        done.add(line)
        res = runner.invoke(app, argv + SIZES.get(argv[0], []))
        out = res.output
        ctx = f"{where}: {line}\n{out[-3000:]}"
        assert "Traceback" not in out, ctx
        assert res.exception is None or isinstance(res.exception, SystemExit), (ctx, res.exception)
        if needs_hub or "--llm" in argv or "--backend vllm" in line:  # --llm: a pretrained LLM from the hub
            last = out.strip().splitlines()[-1]
            assert res.exit_code == 2 and last.startswith("error: "), ctx
            assert ("kdcache[vllm]" if "--backend vllm" in line else "Hugging Face") in last, ctx
            continue
        assert res.exit_code == 0, ctx
        _expect_result(argv, out)
    assert {c.split()[1] for c in done} >= {"make-data", "init-model", "train", "dump", "verify", "inspect",
                                            "export", "eval", "run", "generate", "forward"}
    # the README's Python snippets (loading a checkpoint with plain transformers, the pyarrow and
    # DuckDB queries) run as shown, on what the commands made
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(snippets) >= 2
    for code in snippets:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["t32"].num_rows == scope["t"].num_rows > 0
    report = json.loads((tmp_path / "eval.json").read_text())
    with capsys.disabled():
        print(f"\n[readme] the README's command path (small sizes) reached {100 * report['accuracy_micro']:.1f}% "
              f"on {report['num_samples']} held-out questions")
