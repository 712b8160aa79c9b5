"""LLaVA JSON reading, structural errors, image loading and skip counting."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from kdcache.data.llava import (
    SKIP_REASONS,
    DataError,
    LlavaSample,
    SampleError,
    SkipCounter,
    check_image,
    load_image,
    parse_llava,
    read_llava_json,
    sample_to_json,
)
from kdcache.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("syn"), num_images=6, qa_per_image=3, num_val=4, num_eval=5, seed=1, num_text_only=2
    )


def _write(tmp_path, obj, name="data.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_reads_synthetic_instruct_and_eval(syn):
    samples = read_llava_json(syn["instruct"])
    assert len(samples) == 6 + 2
    assert [s.row for s in samples] == list(range(8))
    with_image = [s for s in samples if s.has_image]
    assert len(with_image) == 6
    for s in with_image:
        assert s.image.endswith(".png") and len(s.turns) == 6
        assert [r for r, _ in s.turns] == ["user", "assistant"] * 3
        assert "<image>" in s.turns[0][1]
        assert s.source == str(syn["instruct"])
    text_only = [s for s in samples if not s.has_image]
    assert len(text_only) == 2 and all(s.image is None and s.extra == {} for s in text_only)
    ev = read_llava_json(syn["eval"])
    assert len(ev) == 5
    for s in ev:
        assert set(s.extra) == {"question_type", "answer"}
        assert s.extra["answer"] == s.turns[1][1]


def test_image_token_position_and_extra_keys_preserved(tmp_path):
    data = [
        {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": "A"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "source": "sharegpt"},
    ]
    s = read_llava_json(_write(tmp_path, data))
    assert s[0].turns == [("user", "Q?\n<image>"), ("assistant", "A")]  # raw text kept as is
    assert s[1].id == "7" and s[1].image is None and s[1].extra == {"source": "sharegpt"}
    assert [sample_to_json(x) for x in s] == [data[0], {**data[1], "id": "7"}]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"id": "a"}, "expected a JSON list"),
        ([{"id": "a", "image": "x.jpg"}], "'conversations' is missing"),
        ([{"id": "a", "conversations": []}], "'conversations' is missing"),
        ([{"id": "a", "conversations": [{"from": "gpt", "value": "A"}]}], "must alternate"),
        (
            [{"id": "a", "conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}]}],
            "must alternate",
        ),
        ([{"id": "a", "conversations": [{"from": "robot", "value": "Q"}]}], "expected 'human' or 'gpt'"),
        ([{"id": "a", "conversations": [{"from": "human"}]}], "'from' and 'value'"),
        ([{"conversations": [{"from": "human", "value": "Q"}]}], "no 'id'"),
    ],
)
def test_structural_errors_name_file_row_and_id(tmp_path, data, needle):
    path = _write(tmp_path, data, "broken.json")
    with pytest.raises(DataError) as e:
        read_llava_json(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg
    if isinstance(data, list) and "id" in data[0]:
        assert "row 0" in msg and "'a'" in msg


def test_not_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_llava_json(p)


def test_second_sample_error_names_its_row(tmp_path):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    bad = {"id": "bad-one", "conversations": [{"from": "gpt", "value": "A"}]}
    with pytest.raises(DataError, match=r"row 1 \(id 'bad-one'\)"):
        parse_llava([good, bad], source="mem.json")


def _sample(sid="s-1"):
    return LlavaSample(id=sid, row=3, image="img.png", turns=[("user", "<image>\nQ"), ("assistant", "A")], source="f.json")


def test_load_image_ok(tmp_path):
    p = tmp_path / "ok.png"
    Image.new("L", (5, 4), 128).save(p)
    im = load_image(p, _sample())
    assert im.mode == "RGB" and im.size == (5, 4) and im.getpixel((0, 0)) == (128, 128, 128)
    check_image(p, _sample())


def test_load_image_missing(tmp_path):
    with pytest.raises(SampleError) as e:
        load_image(tmp_path / "nope.png", _sample("missing-7"))
    err = e.value
    assert err.reason == "missing_image" and err.sample_id == "missing-7" and err.row == 3
    assert "missing-7" in str(err) and "f.json" in str(err) and "nope.png" in str(err) and "Fix:" in str(err)
    with pytest.raises(SampleError, match="missing-7"):
        check_image(tmp_path / "nope.png", _sample("missing-7"))


def test_load_image_corrupt_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    for fn in (load_image, check_image):
        with pytest.raises(SampleError) as e:
            fn(garbage, _sample("bad-bytes"))
        assert e.value.reason == "corrupt_image" and "bad-bytes" in str(e.value)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(SampleError) as e:
        load_image(cut, _sample("half-file"))
    assert e.value.reason == "corrupt_image" and "half-file" in str(e.value)


def test_skip_counter_summary():
    c = SkipCounter()
    assert c.summary() == "skipped 0 samples" and c.total == 0
    c.add(SampleError("a", 0, "too_long", "x"))
    assert c.summary() == "skipped 1 sample: 1 too_long"
    c.add(SampleError("b", 1, "missing_image", "x"))
    c.add(SampleError("c", 2, "missing_image", "x"))
    assert c.summary() == "skipped 3 samples: 2 missing_image, 1 too_long"
    other = SkipCounter()
    other.add(SampleError("d", 3, "empty_response", "x"))
    c.update(other)
    assert c.total == 4 and c.counts["empty_response"] == 1
    out = io.StringIO()
    c.report(out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "skipped 4 samples: 2 missing_image, 1 empty_response, 1 too_long"
    assert any("'b'" in ln for ln in lines[1:])


def test_sample_error_reasons():
    assert SKIP_REASONS == (
        "missing_image",
        "corrupt_image",
        "no_image_token",
        "repeated_image_token",
        "no_response",
        "empty_response",
        "too_long",
        "other",
    )
    with pytest.raises(ValueError, match="unknown SampleError reason"):
        SampleError("a", 0, "bad_reason", "x")
