"""`kdcache generate`: the teacher's own answers, turn by turn, resumable, on the tiny teacher.

Five samples of the synthetic instruct data (multi-turn, with an image) plus one text-only
sample with an extra key; answers of at most 3 new tokens, batches of 2 (the last batch holds
one sample). The random-init teacher's answers are gibberish; what is checked is the structure,
the conditioning on earlier answers, determinism and resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.data.llava import ROLE_ASSISTANT, ROLE_USER, read_llava_json
from kdcache.generate import GenerateError, generate_batch, generate_dataset, sidecar_path
from kdcache.models import image_token_id, load_model, num_image_tokens

NEW = 3
BATCH = 2


@pytest.fixture(scope="module")
def small_data(synth_data, tmp_path_factory) -> Path:
    rows = json.loads(Path(synth_data["instruct"]).read_text())[:5]
    rows[1]["question_type"] = "colour"  # an extra key to keep
    rows.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say a colour."},
                                                      {"from": "gpt", "value": "red"}], "source": "test"})
    p = tmp_path_factory.mktemp("gen") / "small.json"
    p.write_text(json.dumps(rows))
    return p


@pytest.fixture(scope="module")
def first_run(tiny_teacher, synth_data, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_out") / "teacher.json"
    rep = generate_dataset(str(tiny_teacher), str(small_data), str(synth_data["images_root"]), str(out),
                           max_new_tokens=NEW, batch_size=BATCH)
    return out, rep


def test_output_is_llava_json_with_ids_images_turns_kept(first_run, small_data):
    out, rep = first_run
    src, new = read_llava_json(small_data), read_llava_json(out)
    assert rep["samples"] == len(src) == len(new) and rep["skipped"] == {} and rep["generated_now"] == len(src)
    side = [json.loads(line) for line in sidecar_path(out).read_text().splitlines()[1:]]
    answers = {r["row"]: r["answers"] for r in side}
    for a, b in zip(src, new):
        assert (a.id, a.image, a.extra) == (b.id, b.image, b.extra)
        assert len(a.turns) == len(b.turns)
        assert [t for r, t in a.turns if r == ROLE_USER] == [t for r, t in b.turns if r == ROLE_USER]
        assert [t for r, t in b.turns if r == ROLE_ASSISTANT] == answers[a.row]
    assert max(len(s.turns) for s in src) >= 4, "want multi-turn samples"
    assert new[-1].image is None and new[-1].extra == {"source": "test"}


def test_later_turns_see_the_teachers_earlier_answers(first_run, small_data, tiny_teacher, synth_data):
    """Turn 2 of a two-turn sample equals greedy generation from a prompt whose history holds the
    teacher's turn-1 answer (not the dataset's)."""
    from kdcache.data.llava import LlavaSample, load_image
    from kdcache.data.templates import tokenize_prompt

    out, _ = first_run
    src = read_llava_json(small_data)[0]
    new = read_llava_json(out)[0]
    model, processor = load_model(str(tiny_teacher))
    probe = LlavaSample(src.id, src.row, src.image, [src.turns[0], new.turns[1], src.turns[2]], src.extra)
    prompt = tokenize_prompt(probe, processor.tokenizer, template="chat", image_token_id=image_token_id(model.config),
                             num_image_tokens=num_image_tokens(model.config, processor))
    pix = processor.image_processor(images=[load_image(Path(synth_data["images_root"]) / src.image)],
                                    return_tensors="pt")["pixel_values"]
    (want,) = generate_batch(model, processor.tokenizer, [prompt.input_ids], pix, max_new_tokens=NEW,
                             temperature=0.0, top_p=1.0, cut_newline=False)
    assert new.turns[3][1] == want


def test_resume_after_deleting_part_of_the_output(first_run, tiny_teacher, synth_data, small_data, tmp_path):
    """Delete the final JSON and the last three sidecar lines (a whole batch and half of another):
    the rerun regenerates those two batches only and writes the same bytes; a further rerun
    generates nothing."""
    out0, _ = first_run
    out = tmp_path / "teacher.json"
    side = sidecar_path(out)
    side.write_text(sidecar_path(out0).read_text())
    lines = side.read_text().splitlines(keepends=True)
    side.write_text("".join(lines[:-3]) + lines[-3][:10])  # + a torn line, as a crash mid-write leaves
    rep = generate_dataset(str(tiny_teacher), str(small_data), str(synth_data["images_root"]), str(out),
                           max_new_tokens=NEW, batch_size=BATCH)
    assert rep["generated_now"] == 4  # batches of rows 2-3 (half deleted) and 4-5
    assert out.read_bytes() == out0.read_bytes()
    rep = generate_dataset(str(tiny_teacher), str(small_data), str(synth_data["images_root"]), str(out),
                           max_new_tokens=NEW, batch_size=BATCH)
    assert rep["generated_now"] == 0 and out.read_bytes() == out0.read_bytes()
    with pytest.raises(GenerateError, match="max_new_tokens: 3 there, 5 now"):
        generate_dataset(str(tiny_teacher), str(small_data), str(synth_data["images_root"]), str(out),
                         max_new_tokens=5, batch_size=BATCH)


def test_cli_sampling_is_seeded(tiny_teacher, synth_data, small_data, tmp_path):
    """`kdcache generate --temperature 0.7 --seed 1` twice into fresh outputs: identical files."""
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        res = CliRunner().invoke(app, ["generate", "--teacher", str(tiny_teacher), "--data", str(small_data),
                                       "--images", str(synth_data["images_root"]), "--out", str(out),
                                       "--max-new-tokens", str(NEW), "--temperature", "0.7", "--top-p", "0.9",
                                       "--seed", "1", "--batch-size", str(BATCH)])
        assert res.exit_code == 0, res.output
        assert f"wrote {out}: 6 samples" in res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert len(read_llava_json(tmp_path / "a.json")) == 6


class _Completion:  # vLLM's CompletionOutput: the fields generate reads
    def __init__(self, text):
        self.text = text


class _RequestOutput:  # vLLM's RequestOutput: one per prompt, in order
    def __init__(self, text):
        self.outputs = [_Completion(text)]


class _EchoEngine:
    """Stands in for ``vllm.LLM`` (not installed here): records its engine arguments and answers
    each ``TokensPrompt`` with its length and whether it had an image, as vLLM's offline
    ``generate`` returns text, so the vLLM path of ``kdcache generate`` runs end to end."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        _EchoEngine.made.append(kwargs)

    def generate(self, prompts, params, use_tqdm=True):
        assert params.kwargs["max_tokens"] == NEW and params.kwargs["stop_token_ids"]
        return [_RequestOutput(f" len{len(p['prompt_token_ids'])} img{int('multi_modal_data' in p)} \n")
                for p in prompts]


class _Params:  # vllm.SamplingParams: keyword arguments only
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_vllm_backend_passes_the_engine_settings(tiny_teacher, synth_data, small_data, tmp_path, monkeypatch):
    """``--backend vllm`` builds the engine with the --vllm-* settings (tensor parallelism, dtype,
    tokens per step, memory share, context length) and writes the engine's answers, each turn's
    prompt holding the earlier answers."""
    import kdcache.backends.vllm as vb

    monkeypatch.setattr(vb, "import_vllm", lambda: (_EchoEngine, _Params))
    _EchoEngine.made.clear()
    out = tmp_path / "v.json"
    res = CliRunner().invoke(app, ["generate", "--teacher", str(tiny_teacher), "--data", str(small_data),
                                   "--images", str(synth_data["images_root"]), "--out", str(out),
                                   "--max-new-tokens", str(NEW), "--backend", "vllm",
                                   "--vllm-tensor-parallel-size", "2", "--vllm-dtype", "float16",
                                   "--vllm-gpu-memory-utilization", "0.5", "--vllm-max-model-len", "4096",
                                   "--vllm-max-num-batched-tokens", "2048"])
    assert res.exit_code == 0, res.output
    (kw,) = _EchoEngine.made
    assert kw["model"] == str(tiny_teacher) and kw["limit_mm_per_prompt"] == {"image": 1}
    assert (kw["tensor_parallel_size"], kw["dtype"], kw["gpu_memory_utilization"], kw["max_model_len"],
            kw["max_num_batched_tokens"]) == (2, "float16", 0.5, 4096, 2048)
    for s in read_llava_json(out):
        answers = [t for r, t in s.turns if r == ROLE_ASSISTANT]
        assert all(a.startswith("len") and a.endswith(f"img{int(s.image is not None)}") for a in answers)
        lengths = [int(a.split()[0][3:]) for a in answers]
        assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)  # history grows turn by turn
    # Defaults: alone on the GPU the engine gets 0.9 of its memory and the model's own context.
    _EchoEngine.made.clear()
    generate_dataset(str(tiny_teacher), str(small_data), str(synth_data["images_root"]), str(tmp_path / "d.json"),
                     max_new_tokens=NEW, backend="vllm")
    (kw,) = _EchoEngine.made
    assert kw["gpu_memory_utilization"] == 0.9 and "max_model_len" not in kw and kw["tensor_parallel_size"] == 1
