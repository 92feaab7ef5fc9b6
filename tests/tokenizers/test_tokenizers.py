"""Tokenizer toolkit: interface, every variant's round trip and HF export, CLI, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_vpmoe.tokenizers import HARMONY_TOKENS, load, train_tokenizer
from megatron_vpmoe.utils.errors import InputError

SAMPLES = [
    "Hello world",
    "  leading spaces\n\n\ttabs and\r\nCRLF  ",
    "héllo wörld — naïve café 😀 🤖 日本語のテキスト",
    "literal specials <|start|>user<|message|>hi<|end|> and \u2581 marks",
    "x = [i ** 2 for i in range(10)]  # 12345 67.89",
    "",
    "\x00\x01 control \x7f bytes",
]


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text((shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:200_000])
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for kind in ("bpe", "unigram"):
        train_tokenizer(kind, [str(corpus)], 1000, output=str(root / kind))
        out[kind] = root / kind
    return out


def _check_interface(tok, text_sample: str):
    for special in HARMONY_TOKENS + ("<|endoftext|>",):
        assert isinstance(tok.token_to_id(special), int)
    assert len(set(tok.special_tokens.values())) == len(tok.special_tokens)
    assert tok.vocab_size > max(tok.special_tokens.values())
    assert tok.padded_vocab_size(128) % 128 == 0 and tok.padded_vocab_size() >= tok.vocab_size
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, (tok.kind, s)
        # one rule: special-token strings in text are their special ids (as in to_hf and Megatron-LM)
        assert [i for i in ids if i in set(tok.special_tokens.values())] == \
            [tok.token_to_id(t) for t in ("<|start|>", "<|message|>", "<|end|>") if t in s]
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    hf = tok.to_hf()
    for s in SAMPLES + [text_sample]:
        assert hf(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
    assert hf.convert_tokens_to_ids("<|start|>") == tok.token_to_id("<|start|>")
    # the HF side renders Harmony chat strings: specials in text become the special ids
    chat = hf("<|start|>user<|message|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert chat[0] == tok.token_to_id("<|start|>") and chat[-1] == tok.token_to_id("<|end|>")
    assert tok.token_to_id("<|message|>") in chat
    lengths = tok.token_byte_lengths()
    ids = tok.encode(text_sample)
    assert sum(lengths[i] for i in ids) == len(text_sample.encode("utf-8"))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_student_variants(kind, trained, corpus, tmp_path):
    tok = load(trained[kind])
    assert tok.kind == kind and tok.name == kind and tok.vocab_size == 1000
    text = corpus.read_text()[:5000]
    _check_interface(tok, text)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(trained[kind] / "tokenizer.json"))
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    tok.save(tmp_path / "copy")
    assert load(tmp_path / "copy").encode(text) == tok.encode(text)


def test_harmony(tmp_path, shared_data, o200k):
    from megatron_vpmoe.tokenizers import harmony_tokenizer

    tok = harmony_tokenizer()
    assert tok.kind == "harmony" and tok.vocab_size == 201_088 and tok.padded_vocab_size() == 201_088
    assert tok.token_to_id("<|start|>") == 200006 and tok.eod_id == 199999
    assert tok.token_to_id("<|return|>") == 200002 and tok.token_to_id("<|call|>") == 200012
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:20_000]
    import openai_harmony

    enc = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    assert enc.encode(text, allowed_special=set()) == tok.encode(text)
    from megatron_vpmoe.cli import main

    assert main(["tokenizer", "get", "harmony", "--output", str(tmp_path / "harmony")]) == 0
    assert main(["tokenizer", "get", "harmony", "--output", str(tmp_path / "harmony")]) == 2  # exists
    loaded = load(tmp_path / "harmony")
    assert loaded.kind == "harmony" and loaded.vocab_size == 201_088
    _check_interface(loaded, text)


def test_cli_train_and_errors(corpus, tmp_path):
    out = tmp_path / "cli_bpe"
    run = subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", "tokenizer", "train", "--kind", "bpe",
                          "--vocab-size", "600", "--input", str(corpus), "--output", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    meta = json.loads((out / "vpmoe_tokenizer.json").read_text())
    assert meta["kind"] == "bpe" and meta["vocab_size"] == 600
    again = subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", "tokenizer", "train", "--kind", "bpe",
                            "--vocab-size", "100", "--input", str(corpus), "--output", str(tmp_path / "x")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "smaller than the base alphabet" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty corpus"):
        train_tokenizer("bpe", [str(empty)], 1000)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\nmore\xff\xfe here")
    with pytest.raises(InputError, match=r"bad.txt: not UTF-8 at byte offset 14"):
        train_tokenizer("bpe", [str(bad)], 1000)
    with pytest.raises(InputError, match="no such file"):
        train_tokenizer("bpe", [str(tmp_path / "nope*.txt")], 1000)
    with pytest.raises(InputError, match="tokenizer directory not found"):
        load(tmp_path / "missing")
    (tmp_path / "notatok").mkdir()
    with pytest.raises(InputError, match="notatok"):
        load(tmp_path / "notatok")
    good = tmp_path / "good.txt"
    good.write_text("some words here " * 50)
    with pytest.raises(InputError, match="smaller than the base alphabet"):
        train_tokenizer("unigram", [str(good)], 200)


def test_interrupted_training_leaves_no_directory(corpus, tmp_path, monkeypatch):
    from megatron_vpmoe.tokenizers import base

    def boom(self, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(base.HFTokenizer, "_save_artefacts", boom)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer("bpe", [str(corpus)], 600, output=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_jsonl_field_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"content": f"record {i} text about things"}]})
                              for i in range(200)))
    tok = train_tokenizer("bpe", [f"{path}:messages.0.content"], 400)
    assert tok.decode(tok.encode("record 7 text")) == "record 7 text"
    with pytest.raises(InputError, match=r"d.jsonl:1: no field 'nope'"):
        train_tokenizer("bpe", [f"{path}:nope"], 400)


@pytest.mark.parametrize("encoder", ["merges", "min-tokens"])
def test_lengthmax(corpus, tmp_path, encoder):
    """Length-MAX with either encoder: lossless on any input, multi-word tokens, caps respected,
    native HF export encodes identically, and fewer tokens per char than byte-level BPE of the
    same size."""
    from megatron_vpmoe.tokenizers.lengthmax import split_segments, split_units

    text = corpus.read_text()
    assert "".join(split_units(text[:5000])) == text[:5000]
    assert "".join(split_segments(text[:5000])) == text[:5000]
    train, held = text[:150_000], text[150_000:]
    train_file = tmp_path / "train.txt"
    train_file.write_text(train)
    tok = train_tokenizer("lengthmax", [str(train_file)], 1500, output=str(tmp_path / "lm"),
                          max_token_chars=16, max_token_words=3, encoder=encoder)
    loaded = load(tmp_path / "lm")
    assert loaded.kind == "lengthmax" and loaded.vocab_size == 1500
    assert loaded.metadata["encoder"] == {"merges": "bpe-merges", "min-tokens": "unigram-min-tokens"}[encoder]
    _check_interface(loaded, held[:5000])
    assert loaded.encode(held) == tok.encode(held)
    pieces = [loaded.token_bytes(i) for i in range(loaded.vocab_size)]
    assert max(len(p) for p in pieces) <= 16
    assert loaded.metadata["multiword_tokens"] > 0
    assert any(b" " in p.strip(b" ") for p in pieces)  # tokens span whitespace
    bpe = train_tokenizer("bpe", [str(train_file)], 1500)
    assert len(loaded.encode(held)) < 0.97 * len(bpe.encode(held))


def _replay_merges(vocab, text: str):
    """Reference for the merges encoder: apply every learned merge, in order, to each
    blank-line segment's bytes (a plain Python loop; left to right, never overlapping)."""
    from megatron_vpmoe.tokenizers.lengthmax import split_segments

    ids = []
    for segment in split_segments(text):
        seq = list(segment.encode("utf-8"))
        for a, b in vocab.merges:
            new = vocab._ids[vocab.pieces[a] + vocab.pieces[b]]
            out, k = [], 0
            while k < len(seq):
                if k + 1 < len(seq) and seq[k] == a and seq[k + 1] == b:
                    out.append(new)
                    k += 2
                else:
                    out.append(seq[k])
                    k += 1
            seq = out
        ids.extend(seq)
    return ids


def test_lengthmax_merges_encoder_replays_training(corpus):
    """The merges encoder is exactly the learned merges applied in order: on held-out text it
    equals a plain-Python replay; on the training text it reproduces the segmentation training
    ended with (bytes minus the merged occurrences counted while learning); the minimum-token
    encoder never needs more tokens than it on the same vocabulary."""
    from megatron_vpmoe.tokenizers.lengthmax import build_lengthmax_vocab, lengthmax_backend

    text = corpus.read_text()
    train, held = text[:120_000], text[120_000:126_000] + "\n\nnaïve café — 東京 🙂\n\n\nend"
    vocab = build_lengthmax_vocab([train], 700, max_token_chars=16, max_token_words=3)
    assert sum(1 for w in vocab.words if w > 1) > 0  # phase 2 (across units) ran
    merges = lengthmax_backend(vocab, "merges", with_specials=False)
    assert merges.encode(held, add_special_tokens=False).ids == _replay_merges(vocab, held)
    trained = len(merges.encode(train, add_special_tokens=False).ids)
    assert trained == len(train.encode("utf-8")) - sum(vocab.counts[256:])
    fewest = lengthmax_backend(vocab, "min-tokens", with_specials=False)
    assert len(fewest.encode(train, add_special_tokens=False).ids) <= trained
    assert merges.decode(merges.encode(held, add_special_tokens=False).ids) == held


def test_lengthmax_encoder_errors(corpus):
    from megatron_vpmoe.tokenizers.lengthmax import train_lengthmax

    docs = [corpus.read_text()[:20_000]]
    with pytest.raises(InputError, match="overshoot .* needs encoder='min-tokens'"):
        train_lengthmax(docs, 600, overshoot=1.25)
    with pytest.raises(InputError, match="unknown encoder 'viterbi'"):
        train_lengthmax(docs, 600, encoder="viterbi")


def test_pruned(corpus, tmp_path, o200k):
    """Pruned o200k: closed merge graph, bytes/digits/specials kept, ids map back to the
    teacher's, and on the pruning corpus most text keeps the teacher's own tokens."""
    from megatron_vpmoe.tokenizers import harmony_tokenizer
    from megatron_vpmoe.tokenizers.pruned import merge_parents

    tok = train_tokenizer("pruned", [str(corpus)], 4000, output=str(tmp_path / "pruned"))
    loaded = load(tmp_path / "pruned")
    assert loaded.kind == "pruned" and loaded.vocab_size == 4000
    teacher = harmony_tokenizer()
    for token in loaded.ranks:
        assert all(p in loaded.ranks for p in merge_parents(token, teacher.ranks)), token
    assert all(bytes([b]) in loaded.ranks for b in range(256))
    assert all(str(d).encode() in loaded.ranks for d in range(1000))
    text = corpus.read_text()[:20_000]
    _check_interface(loaded, text)
    ids = loaded.encode(text)
    assert teacher.decode([loaded.teacher_ids[i] for i in ids]) == text
    assert loaded.teacher_ids[loaded.token_to_id("<|message|>")] == teacher.token_to_id("<|message|>")
    assert len(ids) < 1.15 * len(teacher.encode(text))
    assert tok.metadata["teacher_usage_covered"] > 0.5


def test_eval_report(trained, corpus, tmp_path):
    """`vpmoe tokenizer eval` writes report.json (required keys, sane numbers), report.md, plots."""
    from megatron_vpmoe.cli import main

    held = tmp_path / "held.txt"
    held.write_text(corpus.read_text()[-30_000:])
    report = tmp_path / "report"
    assert main(["tokenizer", "eval", "--tokenizers", str(trained["bpe"]), str(trained["unigram"]),
                 "--input", str(held), "--report", str(report), "--hidden-size", "64"]) == 0
    rows = json.loads((report / "report.json").read_text())
    assert [r["name"] for r in rows] == ["bpe", "unigram"]
    for r in rows:
        for key in ("name", "kind", "encoder", "vocab_size", "tokens_per_char", "tokens_per_byte", "embedding_head_params",
                    "roundtrip_exact", "encode_mb_per_s", "bytes_per_token", "byte_fallback_rate",
                    "doc_length_percentiles"):
            assert key in r
        assert r["roundtrip_exact"] is True
        assert r["embedding_head_params"] == 2 * 1024 * 64  # vocab 1000 padded to 1024
        assert 0.1 < r["tokens_per_char"] < 1 and r["encode_mb_per_s"] > 0
        assert abs(r["tokens_per_char"] * r["bytes_per_token"] * r["bytes"] / r["chars"] - 1) < 1e-9
    assert "| bpe | bpe |" in (report / "report.md").read_text()
    for png in ("tokens_per_char.png", "doc_lengths.png", "params_vs_compression.png"):
        assert (report / png).stat().st_size > 1000
    assert main(["tokenizer", "eval", "--tokenizers", str(tmp_path / "nope"), "--input", str(held),
                 "--report", str(report)]) == 2


def test_plain_hf_directory(tmp_path, shared_data):
    """A `save_pretrained` directory without vpmoe metadata loads (serve/eval use this path)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([(shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:20_000]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>").save_pretrained(tmp_path / "hf")
    tok = load(tmp_path / "hf")
    assert tok.kind == "bpe" and tok.eod_id == 0 and tok.vocab_size == 300
    assert tok.decode(tok.encode("hello there")) == "hello there"
    assert len(tok.to_hf()) == 300
    with pytest.raises(KeyError, match="<\\|start\\|>"):
        tok.token_to_id("<|start|>")


def test_cli_lengthmax_options(corpus, tmp_path, capsys):
    from megatron_vpmoe.cli import main

    out = tmp_path / "lm"
    assert main(["tokenizer", "train", "--kind", "lengthmax", "--vocab-size", "600", "--input", str(corpus),
                 "--output", str(out), "--max-token-words", "2", "--max-token-chars", "12"]) == 0
    tok = load(out)
    assert tok.metadata["max_token_words"] == 2 and tok.metadata["max_token_chars"] == 12
    assert max(len(tok.token_bytes(i)) for i in range(tok.vocab_size)) <= 12
    assert "trained lengthmax tokenizer" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--kind", "unigram", "--vocab-size", "600", "--input", str(corpus),
                 "--output", str(tmp_path / "u"), "--max-token-words", "2"]) == 2
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "600", "--input", str(corpus),
                 "--output", str(tmp_path / "b"), "--lengthmax-encoder", "min-tokens"]) == 2
    assert main(["tokenizer", "train", "--kind", "lengthmax", "--vocab-size", "600", "--input", str(corpus),
                 "--output", str(tmp_path / "mt"), "--lengthmax-encoder", "min-tokens"]) == 0
    assert load(tmp_path / "mt").metadata["encoder"] == "unigram-min-tokens"
    assert tok.metadata["encoder"] == "bpe-merges"
    assert main(["tokenizer", "train", "--kind", "lengthmax", "--vocab-size", "600", "--input", str(corpus),
                 "--output", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


# "ab" x4, "abc" x5, "ef" x7: after ab (count 9) the next candidates are (ab)c, count 5 x 3 bytes
# = 15, and ef, count 7 x 2 bytes = 14. Length-MAX (count x bytes) takes abc before ef; a
# frequency-only score (BPE) would take ef first.
LENGTHMAX_UNITS = ["ab"] * 4 + ["abc"] * 5 + ["ef"] * 7


def _learned(vocab):
    return [vocab.pieces[a] + vocab.pieces[b] for a, b in vocab.merges]


def test_lengthmax_within_units_scores_count_times_bytes():
    from megatron_vpmoe.tokenizers.lengthmax import build_lengthmax_vocab

    vocab = build_lengthmax_vocab(["\n".join(LENGTHMAX_UNITS)], 3, word_fraction=1.0)  # all 3 within units
    assert _learned(vocab) == [b"ab", b"abc", b"ef"]


def test_lengthmax_across_units_scores_count_times_bytes():
    import numpy as np
    from tqdm import tqdm

    from megatron_vpmoe.tokenizers.lengthmax import _merge_across_units, _Vocab

    seq = [-1]
    for unit in LENGTHMAX_UNITS:  # one token array, -1 between segments
        seq += [*unit.encode(), -1]
    vocab = _Vocab()
    with tqdm(disable=True) as bar:
        _merge_across_units(vocab, np.array(seq), 3, 32, 4, 2, bar)
    assert _learned(vocab) == [b"ab", b"abc", b"ef"]
