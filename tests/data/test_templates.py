"""Templates and tokenisation, token by token, with the synthetic tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdcache.data.llava import LlavaSample, SampleError, read_llava_json
from kdcache.data.synthetic import make_synthetic
from kdcache.data.templates import (
    IGNORE_INDEX,
    QWEN2_BASE_SYSTEM,
    image_placeholder_id,
    template_fingerprint,
    tokenize_prompt,
    tokenize_sample,
)
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL

N_IMG = 4
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("syn"), num_images=8, qa_per_image=3, num_val=2, num_eval=5, seed=0, num_text_only=2
    )


@pytest.fixture(scope="module")
def tok(syn):
    return AutoTokenizer.from_pretrained(syn["tokenizer"])


@pytest.fixture(scope="module")
def img_id(tok):
    return image_placeholder_id(tok)


def S(turns, image="a.png", sid="s-1", row=0):
    return LlavaSample(id=sid, row=row, image=image, turns=turns, source="test.json")


def tk(sample, tok, img_id, template="chat", max_length=512, **kw):
    return tokenize_sample(
        sample, tok, template=template, image_token_id=img_id, num_image_tokens=N_IMG, max_length=max_length, **kw
    )


def runs(t):
    """Split a Tokenized into maximal runs of one role: [(role, ids)]."""
    out = []
    for i, r in enumerate(t.roles.tolist()):
        if out and out[-1][0] == r:
            out[-1][1].append(int(t.input_ids[i]))
        else:
            out.append((r, [int(t.input_ids[i])]))
    return out


def decoded_runs(t, tok):
    return [(r, tok.decode(ids)) for r, ids in runs(t)]


def check_invariants(t):
    assert t.input_ids.dtype == np.int64 and t.labels.dtype == np.int64 and t.roles.dtype == np.uint8
    assert t.input_ids.shape == t.labels.shape == t.roles.shape
    resp = t.roles == ROLE_RESPONSE
    assert np.array_equal(t.labels[resp], t.input_ids[resp])
    assert (t.labels[~resp] == IGNORE_INDEX).all()


def test_image_token_is_one_special_token(tok, img_id):
    assert tok.convert_ids_to_tokens(img_id) == "<image>"
    assert tok("a <image> b", add_special_tokens=False)["input_ids"].count(img_id) == 1


def test_chat_single_turn(tok, img_id):
    t = tk(S([("user", "<image>\nWhat colour is the circle?"), ("assistant", "red")]), tok, img_id)
    check_invariants(t)
    assert t.has_image and t.sample_id == "s-1"
    assert decoded_runs(t, tok) == [
        (ROLE_PROMPT, SYSTEM + "<|im_start|>user\n"),
        (ROLE_VISUAL, "<image>" * N_IMG),
        (ROLE_PROMPT, "\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"),
        (ROLE_RESPONSE, "red<|im_end|>"),
        (ROLE_PROMPT, "\n"),
    ]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    resp_ids = t.input_ids[t.roles == ROLE_RESPONSE].tolist()
    assert resp_ids == tok("red", add_special_tokens=False)["input_ids"] + [im_end]  # end-of-turn is response
    # the assistant header is prompt, token by token
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first_resp = int(np.argmax(t.roles == ROLE_RESPONSE))
    assert t.input_ids[first_resp - len(header) : first_resp].tolist() == header
    assert (t.roles[first_resp - len(header) : first_resp] == ROLE_PROMPT).all()


def test_image_expansion_in_place(tok, img_id):
    t = tk(S([("user", "<image>\nWhat colour is the circle?"), ("assistant", "red")]), tok, img_id)
    vis = np.nonzero(t.roles == ROLE_VISUAL)[0]
    assert len(vis) == N_IMG and np.array_equal(vis, np.arange(vis[0], vis[0] + N_IMG))
    assert (t.input_ids[vis] == img_id).all() and (t.input_ids[t.roles != ROLE_VISUAL] != img_id).all()
    before = tok(SYSTEM + "<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert vis[0] == len(before)
    # a model whose image_token_id is not the tokenizer's placeholder id gets its own id
    t2 = tokenize_sample(
        S([("user", "<image>\nQ?"), ("assistant", "red")]), tok, template="chat", image_token_id=99, num_image_tokens=7, max_length=None
    )
    assert (t2.input_ids[t2.roles == ROLE_VISUAL] == 99).all() and (t2.roles == ROLE_VISUAL).sum() == 7


def test_chat_ids_equal_whole_text_tokenisation(tok, img_id, syn):
    """Segment-wise tokenisation equals tokenising the rendered ChatML text at once."""
    for s in read_llava_json(syn["instruct"]):
        t = tk(s, tok, img_id)
        msgs = [{"role": r, "content": x} for r, x in s.turns]
        if s.has_image:
            q = msgs[0]["content"].replace("<image>", "").strip()
            msgs[0]["content"] = "<image>\n" + q
        full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        ids = t.input_ids.tolist()
        if s.has_image:
            p = ids.index(img_id)
            ids = ids[:p] + ids[p + N_IMG - 1 :]
        assert ids == full, s.id


def test_image_after_text_is_moved_to_front(tok, img_id):
    a = tk(S([("user", "<image>\nWhat colour is the circle?"), ("assistant", "red")]), tok, img_id)
    b = tk(S([("user", "What colour is the circle?\n<image>"), ("assistant", "red")]), tok, img_id)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.roles, b.roles)


def test_chat_multi_turn(tok, img_id):
    s = S([("user", "<image>\nWhat colour is the circle?"), ("assistant", "red"), ("user", "How many objects are there?"), ("assistant", "2")])
    t = tk(s, tok, img_id)
    check_invariants(t)
    assert decoded_runs(t, tok) == [
        (ROLE_PROMPT, SYSTEM + "<|im_start|>user\n"),
        (ROLE_VISUAL, "<image>" * N_IMG),
        (ROLE_PROMPT, "\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"),
        (ROLE_RESPONSE, "red<|im_end|>"),
        (ROLE_PROMPT, "\n<|im_start|>user\nHow many objects are there?<|im_end|>\n<|im_start|>assistant\n"),
        (ROLE_RESPONSE, "2<|im_end|>"),
        (ROLE_PROMPT, "\n"),
    ]


def test_chat_text_only(tok, img_id):
    t = tk(S([("user", "What is 2 plus 3?"), ("assistant", "5")], image=None, sid="txt"), tok, img_id)
    check_invariants(t)
    assert not t.has_image and not (t.roles == ROLE_VISUAL).any()
    assert decoded_runs(t, tok) == [
        (ROLE_PROMPT, SYSTEM + "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"),
        (ROLE_RESPONSE, "5<|im_end|>"),
        (ROLE_PROMPT, "\n"),
    ]


def test_pretrain_caption(tok, img_id):
    s = S([("user", "Describe the image briefly.\n<image>"), ("assistant", "A red circle at the top left.")])
    t = tk(s, tok, img_id, template="pretrain")
    check_invariants(t)
    assert decoded_runs(t, tok) == [(ROLE_VISUAL, "<image>" * N_IMG), (ROLE_RESPONSE, "A red circle at the top left.\n")]
    assert "Describe" not in tok.decode(t.input_ids)  # human text dropped (LLaVA plain)


def test_qwen2_base(tok, img_id):
    s = S([("user", "<image>\nWhat colour is the circle?"), ("assistant", "red"), ("user", "How many objects are there?"), ("assistant", "2")])
    t = tk(s, tok, img_id, template="qwen2_base")
    check_invariants(t)
    assert decoded_runs(t, tok) == [
        (ROLE_PROMPT, QWEN2_BASE_SYSTEM + " USER: "),
        (ROLE_VISUAL, "<image>" * N_IMG),
        (ROLE_PROMPT, "\nWhat colour is the circle? ASSISTANT: "),
        (ROLE_RESPONSE, "red<|endoftext|>"),
        (ROLE_PROMPT, "USER: How many objects are there? ASSISTANT: "),
        (ROLE_RESPONSE, "2<|endoftext|>"),
    ]
    assert t.input_ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>") and t.roles[-1] == ROLE_RESPONSE


@pytest.mark.parametrize("template", ["chat", "qwen2_base", "pretrain"])
def test_prompt_is_prefix_of_training_sequence(tok, img_id, template):
    turns = [("user", "<image>\nWhat colour is the circle?"), ("assistant", "red")]
    if template != "pretrain":
        turns += [("user", "Where is it?"), ("assistant", "top left")]
    t = tk(S(turns), tok, img_id, template=template)
    p = tokenize_prompt(S(turns), tok, template=template, image_token_id=img_id, num_image_tokens=N_IMG)
    last_resp_start = max(i for i in range(1, len(t.roles)) if t.roles[i] == ROLE_RESPONSE and t.roles[i - 1] != ROLE_RESPONSE)
    assert p.input_ids.tolist() == t.input_ids[:last_resp_start].tolist()
    assert np.array_equal(p.roles, t.roles[:last_resp_start]) and (p.labels == IGNORE_INDEX).all()
    # the same prompt when the question has no answer yet
    q = tokenize_prompt(S(turns[:-1]), tok, template=template, image_token_id=img_id, num_image_tokens=N_IMG)
    assert np.array_equal(q.input_ids, p.input_ids)
    if template == "chat":
        assert tok.decode(p.input_ids).endswith("Where is it?<|im_end|>\n<|im_start|>assistant\n")


def test_deterministic(tok, img_id, syn):
    fresh = AutoTokenizer.from_pretrained(syn["tokenizer"])
    for s in read_llava_json(syn["instruct"]):
        for template in ("chat", "qwen2_base"):
            a, b = tk(s, tok, img_id, template), tk(s, fresh, img_id, template)
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.roles, b.roles)


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "turns, image, reason",
    [
        ([("user", "What colour?"), ("assistant", "red")], "a.png", "no_image_token"),
        ([("user", "<image>\nQ?"), ("assistant", "red"), ("user", "<image> again?"), ("assistant", "x")], "a.png", "repeated_image_token"),
        ([("user", "<image><image>\nQ?"), ("assistant", "red")], "a.png", "repeated_image_token"),
        ([("user", "Q?"), ("assistant", "red"), ("user", "<image>\nQ2?"), ("assistant", "x")], "a.png", "no_image_token"),
        ([("user", "<image>\nQ?"), ("assistant", "red")], None, "other"),
        ([("user", "<image>\nQ?")], "a.png", "no_response"),
        ([("user", "<image>\nQ?"), ("assistant", "  ")], "a.png", "empty_response"),
        ([("user", "<image>\nQ?"), ("assistant", "red"), ("user", "Q2"), ("assistant", "")], "a.png", "empty_response"),
    ],
)
@pytest.mark.parametrize("template", ["chat", "qwen2_base"])
def test_bad_samples_raise_with_sample_id(tok, img_id, turns, image, reason, template):
    with pytest.raises(SampleError) as e:
        tk(S(turns, image=image, sid="bad-42", row=9), tok, img_id, template=template)
    assert e.value.reason == reason and e.value.sample_id == "bad-42" and e.value.row == 9
    assert "bad-42" in str(e.value) and "test.json" in str(e.value) and "Fix:" in str(e.value)


def test_pretrain_rejects_multi_turn_and_text_only(tok, img_id):
    for s in (
        S([("user", "<image>\nQ"), ("assistant", "A"), ("user", "Q2"), ("assistant", "B")], sid="mt"),
        S([("user", "Q"), ("assistant", "A")], image=None, sid="txt"),
    ):
        with pytest.raises(SampleError, match=s.id) as e:
            tk(s, tok, img_id, template="pretrain")
        assert e.value.reason == "other"


def test_too_long_error_and_truncate(tok, img_id):
    s = S([("user", "<image>\nWhat colour is the circle?"), ("assistant", "red"), ("user", "How many objects are there?"), ("assistant", "2")], sid="long-1")
    full = tk(s, tok, img_id, max_length=None)
    T = full.num_tokens
    assert tk(s, tok, img_id, max_length=T).num_tokens == T  # exactly max_length is fine
    with pytest.raises(SampleError) as e:
        tk(s, tok, img_id, max_length=T - 1)
    assert e.value.reason == "too_long" and "long-1" in str(e.value) and f"{T} tokens" in str(e.value)
    # truncate: cut after the first answer's end-of-turn token
    first_end = int(np.nonzero(full.roles == ROLE_RESPONSE)[0][1]) + 1
    t = tk(s, tok, img_id, max_length=first_end, on_too_long="truncate")
    assert t.num_tokens == first_end and np.array_equal(t.input_ids, full.input_ids[:first_end])
    assert tok.decode(t.input_ids[t.roles == ROLE_RESPONSE]) == "red<|im_end|>"
    # a cut inside the image span, or one leaving no response, is still too_long
    vis0 = int(np.argmax(full.roles == ROLE_VISUAL))
    for m in (vis0 + 2, vis0 + N_IMG + 3):
        with pytest.raises(SampleError, match="long-1") as e:
            tk(s, tok, img_id, max_length=m, on_too_long="truncate")
        assert e.value.reason == "too_long"


def test_config_errors(tok, img_id):
    s = S([("user", "<image>\nQ"), ("assistant", "A")])
    with pytest.raises(ValueError, match="unknown template"):
        tk(s, tok, img_id, template="vicuna")
    with pytest.raises(ValueError, match="on_too_long"):
        tk(s, tok, img_id, on_too_long="skip")
    no_chat = AutoTokenizer.from_pretrained(tok.name_or_path)
    no_chat.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tk(s, no_chat, img_id)


def test_template_fingerprint(tok, img_id):
    fp = template_fingerprint(tok, template="chat", image_token_id=img_id, num_image_tokens=N_IMG)
    assert fp == template_fingerprint(tok, template="chat", image_token_id=img_id, num_image_tokens=N_IMG)
    assert fp["chat_template_sha256"] is not None and fp["vocab_size"] == len(tok)
    other = template_fingerprint(tok, template="qwen2_base", image_token_id=img_id, num_image_tokens=N_IMG)
    assert other["chat_template_sha256"] is None and other["vocab_sha256"] == fp["vocab_sha256"]
