"""The gigatoken engine's exactness gate: used only when it reproduces the reference ids; refused otherwise."""

import json

import pytest

from megatron_vpmoe.tokenizers import load, train_tokenizer
from megatron_vpmoe.tokenizers.fast import SAMPLE, build_engine

pytest.importorskip("gigatoken")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("fast")
    corpus = str(shared_data / "corpora" / "tinyshakespeare.txt")
    return load(train_tokenizer("bpe", [corpus], 700, max_bytes=150_000).save(out / "bpe700"))


def _texts(shared_data):
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    return text.split("\n\n") + list(SAMPLE) + ["a <|endoftext|> b", "<|start|>user<|message|>hi<|end|>"]


def test_engine_is_used_and_gives_the_reference_ids(bpe, shared_data):
    engine, reason = bpe.fast_engine()
    assert engine is not None, reason
    texts = _texts(shared_data)
    assert bpe.encode_batch(texts) == bpe._encode_plain(texts)
    # special-token strings are their ids (the one rule), also on the fast path
    ids = bpe.encode_batch(["a <|endoftext|> b"])[0]
    assert ids == bpe.encode("a <|endoftext|> b") and bpe.eod_id in ids


def test_a_different_tokenizer_passed_off_as_the_same_is_refused(bpe, tmp_path, shared_data):
    spec = json.loads(bpe._backend.to_str())
    vocab = spec["model"]["vocab"]
    # swap the ids of two byte tokens: same merges, loads fine, different ids for "e" and "t"
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    engine, reason = build_engine(json.dumps(spec), bpe._encode_plain)
    assert engine is None and reason.startswith("ids differ from the reference on sample text 0")
    # the same tokenizer without its special tokens: ordinary text agrees, special strings do not
    spec = json.loads(bpe._backend.to_str())
    spec["added_tokens"] = []
    engine, reason = build_engine(json.dumps(spec), bpe._encode_plain, ["a <|endoftext|> b"])
    assert engine is None and "'a <|endoftext|> b'" in reason, reason
    # another trained tokenizer entirely (smaller vocabulary) under this one's reference
    corpus = str(shared_data / "corpora" / "tinyshakespeare.txt")
    other = train_tokenizer("bpe", [corpus], 500, max_bytes=150_000)
    engine, reason = build_engine(other._backend.to_str(), bpe._encode_plain)
    assert engine is None and "ids differ" in reason
    # the gate really compares: the tokenizer's own json passes under the same reference
    engine, reason = build_engine(bpe._backend.to_str(), bpe._encode_plain, ["a <|endoftext|> b"])
    assert engine is not None and reason == ""


def test_unloadable_or_disabled_engine_falls_back_with_a_reason(bpe, monkeypatch, shared_data):
    spec = json.loads(bpe._backend.to_str())
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\n\n"}, "behavior": "Isolated", "invert": False}
    engine, reason = build_engine(json.dumps(spec), bpe._encode_plain)
    assert engine is None and reason.startswith("gigatoken cannot load this tokenizer.json")
    monkeypatch.setenv("VPMOE_FAST_TOKENIZER", "0")
    engine, reason = build_engine(bpe._backend.to_str(), bpe._encode_plain)
    assert engine is None and reason == "VPMOE_FAST_TOKENIZER=0"
