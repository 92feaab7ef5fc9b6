"""`vpmoe preprocess`: shards megatron-core reads, every variant from one pass, Harmony loss
masks aligned token for token, bad records skipped with file:line, atomic outputs, resume."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy
import pytest

from helpers.needs import need_data
from megatron_vpmoe.cli import main
from megatron_vpmoe.data.preprocess import PreprocessOptions, merge_shards, run_preprocess
from megatron_vpmoe.data.shards import read_shard, token_dtype
from megatron_vpmoe.tokenizers import load, train_tokenizer
from megatron_vpmoe.utils.errors import InputError
from helpers.paths import ROOT as REPO_ROOT

ROOT = str(REPO_ROOT)  # a string: it goes into environment variables


@pytest.fixture(scope="module")
def toks(tmp_path_factory, shared_data):
    """Two small student tokenizers (Harmony specials included) trained on Shakespeare."""
    out = tmp_path_factory.mktemp("toks")
    corpus = str(shared_data / "corpora" / "tinyshakespeare.txt")
    dirs = {}
    for kind, size in (("bpe", 600), ("unigram", 500)):
        tok = train_tokenizer(kind, [corpus], size, max_bytes=150_000)
        dirs[f"{kind}{size}"] = str(tok.save(out / f"{kind}{size}"))
    return dirs


def _opts(inputs, prefix, toks, **kw):
    kw.setdefault("progress", False)
    return PreprocessOptions(inputs=[str(i) for i in inputs], output_prefix=str(prefix), tokenizers=toks, **kw)


def _docs(prefix):
    ds = read_shard(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_every_variant_round_trips_and_megatron_reads_it(tmp_path, toks, shared_data):
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:30_000]
    blocks = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for i, b in enumerate(blocks):
            f.write(json.dumps({"meta": {"body": b}, "id": i}) + "\n")
    summary = run_preprocess(_opts([src], tmp_path / "out" / "s", toks, json_keys=["meta.body"], workers=2,
                                   chunk_size=7))
    assert summary["documents"] == len(blocks) and not summary["skipped"]
    for variant, path in toks.items():
        tok = load(path)
        prefix = str(tmp_path / "out" / f"s.{variant}_meta.body_document")
        docs = _docs(prefix)
        assert len(docs) == len(blocks)
        assert read_shard(prefix).index.dtype == numpy.uint16  # vocab < 65,500
        for ids, block in zip(docs, blocks):
            assert ids[-1] == tok.eod_id
            assert tok.decode(ids[:-1]) == block
        assert summary["tokens_per_variant"][variant] == sum(map(len, docs))
        assert not os.path.exists(prefix.replace("_document", "_lossmask_document") + ".bin")
    # megatron-core's own GPTDataset over a produced shard
    from megatron.core.datasets.gpt_dataset import GPTDataset
    assert GPTDataset.numel_low_level_dataset(read_shard(str(tmp_path / "out" / "s.bpe600_meta.body_document"))) \
        == len(blocks)
    assert token_dtype(201_088) == numpy.int32 and token_dtype(65_000) == numpy.uint16
    # one worker gives the same bytes as two
    run_preprocess(_opts([src], tmp_path / "one" / "s", toks, json_keys=["meta.body"], workers=1))
    for variant in toks:
        a = (tmp_path / "out" / f"s.{variant}_meta.body_document.bin").read_bytes()
        assert a == (tmp_path / "one" / f"s.{variant}_meta.body_document.bin").read_bytes()


def _expected_roles(text):
    """An independent reading of the Harmony spec: message bodies of the assistant's analysis
    channel are 1, other assistant channels 2 (closing token included), everything else 0."""
    spans = []  # (start, end, role) character spans of bodies+closer
    for m in re.finditer(r"<\|start\|>(.*?)<\|message\|>(.*?)(<\|end\|>|<\|return\|>|<\|call\|>|$)", text, re.S):
        header, body_start, end = m.group(1), m.start(2), m.end(3)
        if header.startswith("assistant"):
            channel = re.search(r"<\|channel\|>(\w+)", header)
            spans.append((body_start, end, 1 if channel and channel.group(1) == "analysis" else 2))
    return spans


def test_harmony_fixture_masks_line_up(tmp_path, toks, o200k):
    fixtures = sorted((need_data("harmony/fixtures") / "harmony" / "fixtures").glob("*.txt"))
    texts = [f.read_text() for f in fixtures]
    texts = [t for t in texts if t.lstrip().startswith("<|start|>")]
    assert len(texts) >= 10
    src = tmp_path / "harmony.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = run_preprocess(_opts([src], tmp_path / "h", {"bpe600": toks["bpe600"]}, append_eod=False))
    assert summary["documents"] == len(texts)
    tok = load(toks["bpe600"])
    ids_docs = _docs(str(tmp_path / "h.bpe600_text_document"))
    mask_docs = _docs(str(tmp_path / "h.bpe600_text_lossmask_document"))
    supervised = {1: 0, 2: 0}
    for text, ids, roles in zip(texts, ids_docs, mask_docs):
        assert len(ids) == len(roles)
        assert tok.decode(ids) == text
        # rebuild each role's text from the tokens and compare with the spec's spans
        for role in (1, 2):
            got = [tok.decode([i for i, _ in run]) for r, run in itertools.groupby(zip(ids, roles), lambda x: x[1])
                   if r == role]
            want = [text[a:b] for a, b, r in _expected_roles(text) if r == role and b > a]
            assert got == want, (role, got, want)
            supervised[role] += len(want)
    assert supervised[1] >= 2 and supervised[2] >= 2  # the fixtures hold analysis and final/commentary turns


def test_chat_records_with_reasoning(tmp_path, toks, o200k):
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "thinking": "Add two and two.", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]},
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["preprocess", "--input", str(src), "--json-keys", "messages", "--output-prefix",
                 str(tmp_path / "kd"), "--tokenizer", f"student={toks['bpe600']}", "--no-progress"]) == 0
    tok = load(toks["bpe600"])
    ids = _docs(str(tmp_path / "kd.student_messages_document"))
    roles = _docs(str(tmp_path / "kd.student_messages_lossmask_document"))
    first = dict(zip(("reasoning", "final"), (tok.decode([i for i, r in zip(ids[0], roles[0]) if r == k])
                                               for k in (1, 2))))
    assert first == {"reasoning": "Add two and two.<|end|>", "final": "4<|return|>"}
    assert tok.decode([i for i, r in zip(ids[1], roles[1]) if r == 1]) == ""
    assert tok.decode([i for i, r in zip(ids[1], roles[1]) if r == 2]) == "Blue.<|return|>"
    assert roles[0][-1] == 0 and ids[0][-1] == tok.eod_id  # EOD is not supervised after <|return|>
    assert "Be brief." in tok.decode(ids[0])


def test_plain_documents_before_and_after_a_chat_get_text_masks(tmp_path, toks, o200k):
    """The mask shard opens at the first chat document of a field; the plain documents before
    it are back-filled with role 3, so masks stay aligned document for document."""
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    records = [{"messages": "Plain text one."}, {"messages": "Plain two, a bit longer."}, chat,
               {"messages": "Plain three."}]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_preprocess(_opts([src], tmp_path / "mx", {"s": toks["bpe600"]}, json_keys=["messages"]))
    ids = _docs(str(tmp_path / "mx.s_messages_document"))
    roles = _docs(str(tmp_path / "mx.s_messages_lossmask_document"))
    assert [len(r) for r in roles] == [len(i) for i in ids] and len(ids) == 4
    for k in (0, 1, 3):
        assert set(roles[k]) == {3}
    assert 2 in roles[2] and 3 not in roles[2]


def test_bad_records_are_skipped_with_positions_and_strict_is_fatal(tmp_path, toks, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": broken\n{"other": "x"}\n{"text": "caf\xe9"}\n'
                    b'{"text": "   "}\n{"text": 5}\n[1, 2]\n{"text": "good two"}\n')
    prefix = tmp_path / "b"
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(prefix), "--tokenizer",
                 toks["bpe600"], "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "b.summary.json").read_text())
    assert summary["documents"] == 2
    assert summary["skipped"] == {"malformed_json": 2, "missing_key": 1, "invalid_utf8": 1, "empty": 1,
                                  "not_text": 1}
    assert summary["first_skipped"]["malformed_json"] == [f"{src}:2", f"{src}:7"]
    assert f"{src}:4" in out and "invalid_utf8" in out
    assert len(_docs(str(tmp_path / "b.bpe600_text_document"))) == 2
    # --strict: the first bad record stops the run, one line naming file:line, nothing published
    strict = tmp_path / "strict"
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(strict), "--tokenizer",
                 toks["bpe600"], "--no-progress", "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{src}:2" in err and "malformed json" in err
    assert not list(tmp_path.glob("strict*"))


def test_usage_errors_are_one_line(tmp_path, toks, capsys):
    assert main(["preprocess", "--input", str(tmp_path / "nothing*.jsonl"), "--output-prefix",
                 str(tmp_path / "x"), "--tokenizer", toks["bpe600"]]) == 2
    assert "no input files" in capsys.readouterr().err
    assert main(["preprocess", "--output-prefix", str(tmp_path / "x")]) == 2
    assert "--input" in capsys.readouterr().err


def test_interrupted_run_leaves_no_valid_shards_and_partitions_resume(tmp_path, toks):
    inputs = sorted((need_data("corpora/code_python") / "corpora" / "code_python").glob("*.py"))[:12]
    prefix = tmp_path / "p"
    # the HF encoder (not gigatoken, ~25x faster) keeps the run long enough to be killed midway
    env = dict(os.environ, PYTHONPATH=ROOT, VPMOE_FAST_TOKENIZER="0")
    cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "preprocess", "--input", *map(str, inputs),
           "--output-prefix", str(prefix), "--tokenizer", toks["bpe600"], "--no-progress",
           "--partitions", "3", "--chunk-size", "1"]
    proc = subprocess.Popen(cmd + ["--workers", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("p_part000of003*.idx")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = [p for p in tmp_path.glob("p.bpe600_text_document.*") if p.suffix in (".bin", ".idx")]
    assert final == []  # nothing that looks like a finished dataset
    done_parts = list(tmp_path.glob("p_part*of003.summary.json"))
    out = subprocess.run(cmd + ["--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("already written") == len(done_parts)
    docs = _docs(str(prefix) + ".bpe600_text_document")
    tok = load(toks["bpe600"])
    texts = sorted(tok.decode(d[:-1]) for d in docs)
    assert texts == sorted(p.read_text() for p in inputs)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("p_part*"))
    # up to date: a re-run does nothing
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_merge_and_megatron_flags_tool(tmp_path, toks, shared_data):
    src = tmp_path / "a.txt"
    src.write_text("first block\n\nsecond block\n\n\nthird block\n")
    tool = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py")]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(tool + ["--input", str(src), "--output-prefix", str(tmp_path / "out" / "a"),
                                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", toks["bpe600"],
                                 "--txt-blocks", "--workers", "1", "--log-interval", "1", "--no-progress"],
                         env=dict(env, VPMOE_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    # Megatron-LM's names, and nothing else in the output folder
    assert sorted(os.listdir(tmp_path / "out")) == ["a_text_document.bin", "a_text_document.idx"]
    docs = _docs(str(tmp_path / "out" / "a_text_document"))
    tok = load(toks["bpe600"])
    assert [tok.decode(d) for d in docs] == ["first block", "second block", "third block"]  # no --append-eod
    run_preprocess(_opts([src], tmp_path / "b", {"bpe600": toks["bpe600"]}, txt_blocks=True))
    result = merge_shards([str(tmp_path / "out" / "a_text_document"), str(tmp_path / "b.bpe600_text_document")],
                          str(tmp_path / "m_text_document"))
    assert result[str(tmp_path / "m_text_document")]["documents"] == 6
    assert _docs(str(tmp_path / "m_text_document"))[:3] == docs


# ---- parallel pieces: workers read, encode and write byte ranges; the output is the serial one ----

def _outputs(prefix):
    """Every .bin/.idx of an output prefix, by suffix, as bytes."""
    folder, stem = os.path.split(str(prefix))
    return {name[len(stem):]: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.startswith(stem + ".") and name.endswith((".bin", ".idx"))}


def _serial_and_pieces(tmp_path, inputs, toks, piece_bytes, **kw):
    """The same inputs as one in-process piece (serial) and as many small pieces in 2 workers."""
    serial = run_preprocess(_opts(inputs, tmp_path / "serial" / "s", toks, workers=1, piece_bytes=1 << 40, **kw))
    pieces = run_preprocess(_opts(inputs, tmp_path / "pieces" / "s", toks, workers=2, piece_bytes=piece_bytes,
                                  chunk_size=3, **kw))
    a, b = _outputs(tmp_path / "serial" / "s"), _outputs(tmp_path / "pieces" / "s")
    assert a and a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    for key in ("documents", "bytes", "skipped", "first_skipped", "tokens_per_variant", "shards"):
        assert serial[key] == pieces[key], key
    assert not list(tmp_path.rglob("*.tmp"))
    return serial


def test_split_file_cuts_at_line_starts_with_absolute_line_numbers(tmp_path):
    from megatron_vpmoe.data.sources import plan_pieces, split_file

    data = b"".join(b'{"text": "%s"}\n' % (b"x" * (5000 if i == 3 else i)) for i in range(40))
    src = tmp_path / "a.jsonl"
    src.write_bytes(data)
    segments = split_file(src, 50)
    assert 1 < len(segments) < 50  # targets inside the long line collapse into one boundary
    assert segments[0].start == 0 and segments[-1].end == len(data)
    for seg, nxt in zip(segments, segments[1:]):
        assert seg.end == nxt.start and data[nxt.start - 1:nxt.start] == b"\n"
        assert nxt.first_line == data[:nxt.start].count(b"\n") + 1
    long_line = data.index(b"x" * 5000)
    assert any(s.start <= long_line < s.end and s.end - s.start > 5000 for s in segments)
    # text blocks: a piece starts only after a blank (or whitespace-only) line
    text = b"a\nb\n\nc\n \t\nd\ne\nf\n\n\ng\n" * 20
    (tmp_path / "t.txt").write_bytes(text)
    for seg in split_file(tmp_path / "t.txt", 30, after_blank=True)[1:]:
        assert text[:seg.start].split(b"\n")[-2].strip() == b""
    # small files are grouped, compressed ones never split, empty files kept
    (tmp_path / "e.jsonl").write_bytes(b"")
    with gzip.open(tmp_path / "z.jsonl.gz", "wb") as f:
        f.write(data)
    pieces = plan_pieces([tmp_path / "e.jsonl", tmp_path / "t.txt", tmp_path / "z.jsonl.gz", src], 1000)
    kinds = [[(s.path.name, s.end is None) for s in p.segments] for p in pieces]
    # .txt without --txt-blocks and .gz are whole files, grouped while under the piece size
    assert kinds[0] == [("e.jsonl", True), ("t.txt", True), ("z.jsonl.gz", True)]
    assert all(k == [("a.jsonl", False)] for k in kinds[1:]) and len(kinds) == 4  # the long line: 3 pieces
    assert [p.index for p in pieces] == list(range(len(pieces)))


def test_byte_range_pieces_give_the_serial_output_jsonl(tmp_path, toks, shared_data):
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:40_000]
    blocks = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    lines = [json.dumps({"text": b}).encode() for b in blocks]
    lines.insert(3, json.dumps({"text": "\n\n".join(blocks[:40])}).encode())  # one line over many pieces
    bad_at = [len(lines) - 7, len(lines) - 2]  # bad records deep in later pieces (0-based)
    lines[bad_at[0]] = b'{"text": broken'
    lines[bad_at[1]] = b'{"text": "caf\xe9"}'
    lines[10] = b"   "  # blank lines are not records
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"\n".join(lines))  # no newline at the end
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "tiny.jsonl").write_bytes(b'{"text": "hi"}\n')  # smaller than the piece count
    inputs = [tmp_path / "tiny.jsonl", big, tmp_path / "empty.jsonl"]
    summary = _serial_and_pieces(tmp_path, inputs, toks, piece_bytes=700)
    assert summary["first_skipped"] == {"malformed_json": [f"{big}:{bad_at[0] + 1}"],
                                        "invalid_utf8": [f"{big}:{bad_at[1] + 1}"]}
    assert summary["bytes"] == sum(os.path.getsize(p) for p in inputs)
    # independently of the serial run: each record is its text's ids + EOD, in input order
    tok = load(toks["bpe600"])
    want = ["hi"] + [json.loads(line)["text"] for i, line in enumerate(lines) if i not in bad_at and line.strip()]
    docs = _docs(str(tmp_path / "pieces" / "s.bpe600_text_document"))
    assert [tok.decode(d[:-1]) for d in docs] == want and {d[-1] for d in docs} == {tok.eod_id}


def test_byte_range_pieces_give_the_serial_output_txt_blocks(tmp_path, toks, shared_data):
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_bytes()[:30_000]
    text = text.replace(b"\n\n", b"\n  \t\n", 20).replace(b"\n\n", b"\r\n\r\n", 10)  # blank-ish lines
    bad = text.index(b"\n\n", 25_000) + 2  # an invalid-UTF-8 block in a later piece
    text = text[:bad] + b"caf\xe9 au lait\n" + text[bad:]
    src = tmp_path / "play.txt"
    src.write_bytes(text + b"\n\n\nlast block, no newline")
    summary = _serial_and_pieces(tmp_path, [src], toks, piece_bytes=500, txt_blocks=True)
    bad_line = text[:bad].count(b"\n") + 1
    assert summary["first_skipped"] == {"invalid_utf8": [f"{src}:{bad_line}"]}
    tok = load(toks["bpe600"])
    docs = _docs(str(tmp_path / "pieces" / "s.bpe600_text_document"))
    assert tok.decode(docs[-1][:-1]) == "last block, no newline" and len(docs) == summary["documents"] > 100


def test_chat_loss_masks_from_pieces_match_the_serial_run(tmp_path, toks, o200k):
    chat = {"messages": [{"role": "user", "content": "Hi?"},
                         {"role": "assistant", "thinking": "Greet back.", "content": "Hello."}]}
    plain = [{"messages": f"Plain document number {i}, " + "words " * (i % 7)} for i in range(60)]
    # plain pieces before the first chat (the parent back-fills their masks), chat in the middle,
    # plain pieces after it, and a bad chat record
    records = plain[:30] + [chat] + plain[30:45] + [{"messages": [{"role": "bogus"}]}] + plain[45:] + [chat]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain_only = tmp_path / "plain_only.jsonl"  # a field without chat: no mask dataset at all
    plain_only.write_text("".join(json.dumps(r) + "\n" for r in plain))
    summary = _serial_and_pieces(tmp_path, [src], toks, piece_bytes=200, json_keys=["messages"])
    assert summary["shards"]["bpe600/messages"]["loss_mask"] and summary["documents"] == len(records) - 1
    assert list(summary["skipped"]) == ["bad_chat (unsupported role 'bogus' (system, developer, user, assistant))"]
    roles = _docs(str(tmp_path / "pieces" / "s.bpe600_messages_lossmask_document"))
    assert set(roles[0]) == {3} and 2 in roles[30] and set(roles[31]) == {3} and 1 in roles[-1]
    out = _serial_and_pieces(tmp_path / "p", [plain_only], toks, piece_bytes=200, json_keys=["messages"])
    assert not out["shards"]["bpe600/messages"]["loss_mask"]
    assert not list((tmp_path / "p" / "pieces").glob("*lossmask*"))


def test_strict_from_a_worker_names_the_first_bad_record_and_publishes_nothing(tmp_path, toks, capsys):
    lines = [json.dumps({"text": f"record {i} " + "and more " * 20}) for i in range(200)]
    lines[150] = '{"other": 1}'  # the first bad record, in a later piece
    lines[190] = '{"text": broken'
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{src}:151: missing key (--strict)")):
        run_preprocess(_opts([src], tmp_path / "out" / "s", toks, workers=2, piece_bytes=500, strict=True))
    assert not list((tmp_path / "out").iterdir())
    # progress from the workers' counters reaches every document and byte (log lines without a bar)
    lines[150] = lines[190] = lines[0]
    src.write_text("\n".join(lines) + "\n")
    summary = run_preprocess(_opts([src], tmp_path / "ok" / "s", {"bpe600": toks["bpe600"]}, workers=2,
                                   piece_bytes=500, log_interval=1))
    assert f"preprocess: {len(lines)} documents" in capsys.readouterr().out
    assert summary["bytes"] == os.path.getsize(src)


def test_shard_writer_matches_megatron_core_builder_byte_for_byte(tmp_path):
    """The native .bin/.idx writer against megatron-core's IndexedDatasetBuilder, token and mask
    dtypes, appended pieces and merged multi-sequence documents included."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_vpmoe.data.shards import ShardWriter

    rng = numpy.random.default_rng(0)
    for vocab in (600, 65_499, 65_500, 201_088):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)
    docs = [rng.integers(0, 60_000, size=n).tolist() for n in (1, 7, 300, 2, 0, 45)]
    for dtype in (numpy.uint16, numpy.int32, numpy.uint8):
        docs_d = [[x % 256 for x in d] if dtype == numpy.uint8 else d for d in docs]
        ref = IndexedDatasetBuilder(str(tmp_path / f"ref{dtype.__name__}.bin"), dtype=dtype)
        for d in docs_d:
            # an empty document has no sequence, as Megatron-LM's preprocess_data.py adds it
            ref.add_document(numpy.array(d, dtype=dtype), [len(d)] if d else [])
        ref.finalize(str(tmp_path / f"ref{dtype.__name__}.idx"))
        # the same documents: two added, a piece of two appended from a raw file, two constant
        piece = ShardWriter(str(tmp_path / f"piece{dtype.__name__}"), dtype)
        for d in docs_d[2:4]:
            piece.add_many([d])
        piece_bin, piece_lengths, piece_documents = piece.finish_data()
        ours = ShardWriter(str(tmp_path / f"ours{dtype.__name__}"), dtype)
        for d in docs_d[:2]:
            ours.add_many([d])
        ours.append_data(piece_bin, piece_lengths, piece_documents)
        ours.add_many([docs_d[4]])
        ours.add_many([docs_d[5]])
        ours.commit()
        batched = ShardWriter(str(tmp_path / f"batched{dtype.__name__}"), dtype)  # a chunk in one write
        batched.add_many(docs_d[:3])
        batched.add_many([])
        batched.add_many(docs_d[3:])
        batched.commit()
        for ext in (".bin", ".idx"):
            for name in ("ours", "batched"):
                assert (tmp_path / f"ref{dtype.__name__}{ext}").read_bytes() == \
                    (tmp_path / f"{name}{dtype.__name__}{ext}").read_bytes(), (dtype, ext, name)
        assert _docs(str(tmp_path / f"ours{dtype.__name__}")) == [d for d in docs_d if d]  # sequences
        assert len(read_shard(str(tmp_path / f"ours{dtype.__name__}")).document_indices) == len(docs_d) + 1
    const = ShardWriter(str(tmp_path / "const"), numpy.uint8)
    const.append_constant(3, [4, 0, 2])
    const.commit()
    assert _docs(str(tmp_path / "const")) == [[3] * 4, [3] * 2]  # the empty document has no sequence
    assert read_shard(str(tmp_path / "const")).document_indices.tolist() == [0, 1, 1, 2]
    # a Megatron shard with several sequences per document merges with its document indices
    multi = IndexedDatasetBuilder(str(tmp_path / "multi.bin"), dtype=numpy.uint16)
    multi.add_document(numpy.array([1, 2, 3, 4, 5], dtype=numpy.uint16), [2, 3])
    multi.add_document(numpy.array([6], dtype=numpy.uint16), [1])
    multi.finalize(str(tmp_path / "multi.idx"))
    ref = IndexedDatasetBuilder(str(tmp_path / "mref.bin"), dtype=numpy.uint16)
    ref.add_document(numpy.array([9, 9], dtype=numpy.uint16), [2])
    ref.add_index(str(tmp_path / "multi"))
    ref.finalize(str(tmp_path / "mref.idx"))
    ours = ShardWriter(str(tmp_path / "mours"), numpy.uint16)
    ours.add_many([[9, 9]])
    ours.merge(str(tmp_path / "multi"))
    ours.commit()
    assert ours.documents == 3 and ours.tokens == 8
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mref{ext}").read_bytes() == (tmp_path / f"mours{ext}").read_bytes()


# ---- hardening (issue 20, item 4): truncated and stale inputs, mixed pairs, empty results, huge lines ----

def _jsonl_bytes(n):
    return b"".join(json.dumps({"text": f"document {i} " + "word " * (i % 13)}).encode() + b"\n" for i in range(n))


def _published(tmp_path, stem):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(stem))


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_or_fake_compressed_input_is_one_line_and_publishes_nothing(tmp_path, toks, capsys, workers):
    import zstandard

    data = _jsonl_bytes(7222)
    z = zstandard.ZstdCompressor().compress(data)
    g = gzip.compress(data)
    cases = {"half.jsonl.zst": z[: len(z) // 2], "half.jsonl.gz": g[: len(g) // 2], "fake.jsonl.gz": b"not gzip",
             "fake.jsonl.zst": b"not zstd at all"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        stem = name.split(".")[0] + name.split(".")[-1]
        assert main(["preprocess", "--input", str(tmp_path / name), "--output-prefix", str(tmp_path / stem),
                     "--tokenizer", toks["bpe600"], "--no-progress", "--workers", str(workers)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(tmp_path / name) in err and "corrupt or truncated" in err, err
        assert _published(tmp_path, stem) == [], name
    # whole files still read completely, several zstd frames included (the old reader stopped at the first)
    (tmp_path / "two.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data[:5000])
                                             + zstandard.ZstdCompressor().compress(data[5000:]))
    summary = run_preprocess(_opts([tmp_path / "two.jsonl.zst"], tmp_path / "two", toks, workers=workers))
    assert summary["documents"] == 7222 and not summary["skipped"]


def test_up_to_date_means_same_inputs_tokenizers_and_flags(tmp_path, toks, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "first version"}\n')
    prefix = str(tmp_path / "s")
    cmd = ["preprocess", "--input", str(src), "--output-prefix", prefix, "--no-progress"]
    tok_a = ["--tokenizer", f"t={toks['bpe600']}"]
    tok_b = ["--tokenizer", f"t={toks['unigram500']}"]
    shard = prefix + ".t_text_document"

    def text():
        return load(toks["bpe600"]).decode(_docs(shard)[0][:-1])

    assert main(cmd + tok_a) == 0 and text() == "first version"
    capsys.readouterr()
    assert main(cmd + tok_a) == 0 and "up to date" in capsys.readouterr().out
    src.write_text('{"text": "second version, longer"}\n')  # same name, new content
    assert main(cmd + tok_a) == 0
    out = capsys.readouterr().out
    assert "inputs changed" in out and "up to date" not in out and text() == "second version, longer"
    assert main(cmd + tok_b) == 0  # same variant name, another tokenizer
    assert "tokenizers changed" in capsys.readouterr().out
    assert _docs(shard)[0] == list(load(toks["unigram500"]).encode("second version, longer")) + [
        load(toks["unigram500"]).eod_id]
    assert main(cmd + tok_b + ["--no-append-eod"]) == 0
    assert "flags changed" in capsys.readouterr().out and len(_docs(shard)[0]) == len(
        load(toks["unigram500"]).encode("second version, longer"))
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert set(summary["fingerprint"]) >= {"inputs", "tokenizers", "flags"}
    assert summary["files"] == {n: os.path.getsize(tmp_path / n) for n in
                                ("s.t_text_document.bin", "s.t_text_document.idx")}


def test_kill_between_bin_and_idx_renames_of_an_overwrite_is_never_up_to_date(tmp_path, toks, monkeypatch):
    from megatron_vpmoe.data import shards

    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps({"text": f"old text number {i}"}) + "\n" for i in range(5)))
    new.write_text("".join(json.dumps({"text": f"a new and rather longer text {i}"}) + "\n" for i in range(9)))
    prefix = tmp_path / "s"
    shard = str(prefix) + ".bpe600_text_document"
    tok = {"bpe600": toks["bpe600"]}
    run_preprocess(_opts([old], prefix, tok))
    real_replace, seen = os.replace, []

    def killed_after_bin(src, dst):  # the process dies right after the new .bin took its name
        real_replace(src, dst)
        seen.append(str(dst))
        if str(dst).endswith(".bin"):
            raise KeyboardInterrupt

    monkeypatch.setattr(shards.os, "replace", killed_after_bin)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(_opts([new], prefix, tok, overwrite=True))
    monkeypatch.setattr(shards.os, "replace", real_replace)
    assert seen == [shard + ".bin"]
    # no new .bin beside the old .idx: the pair is incomplete, and no summary calls it finished
    assert not os.path.exists(shard + ".idx") and not (tmp_path / "s.summary.json").exists()
    with pytest.raises(InputError, match="missing"):
        read_shard(shard)
    again = run_preprocess(_opts([old], prefix, tok))  # the rerun rebuilds instead of "up to date"
    assert not again.get("up_to_date") and again["documents"] == 5
    tokenizer = load(toks["bpe600"])
    assert [tokenizer.decode(d[:-1]) for d in _docs(shard)] == [f"old text number {i}" for i in range(5)]


def test_a_bin_that_does_not_match_its_index_fails_inspect_and_the_up_to_date_check(tmp_path, toks, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"some text {i}"}) + "\n" for i in range(20)))
    prefix = tmp_path / "s"
    run_preprocess(_opts([src], prefix, {"bpe600": toks["bpe600"]}))
    shard = str(prefix) + ".bpe600_text_document"
    assert main(["preprocess", "inspect", shard]) == 0
    capsys.readouterr()
    size = os.path.getsize(shard + ".bin")
    with open(shard + ".bin", "r+b") as f:
        f.truncate(size - 6)
    assert main(["preprocess", "inspect", shard]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{shard}.bin: {size - 6} bytes" in err and "truncated" in err
    summary = run_preprocess(_opts([src], prefix, {"bpe600": toks["bpe600"]}))  # rebuilt, not "up to date"
    assert not summary.get("up_to_date") and os.path.getsize(shard + ".bin") == size


@pytest.mark.parametrize("partitions", [1, 2])
def test_empty_or_all_skipped_input_exits_2_and_publishes_nothing(tmp_path, toks, capsys, partitions):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": broken\n{"other": 1}\n{"text": "  "}\n')
    for name, inputs, expect in (("e", [empty], "no documents in the input"),
                                 ("b", [bad], "all 3 records were skipped"),
                                 ("eb", [empty, bad], "all 3 records were skipped")):
        assert main(["preprocess", "--input", *map(str, inputs), "--output-prefix", str(tmp_path / name),
                     "--tokenizer", toks["bpe600"], "--no-progress", "--partitions", str(partitions)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(inputs[0]) in err and expect in err, err
        assert [p for p in _published(tmp_path, name + ".") + _published(tmp_path, name + "_")] == []


def _max_rss_mb_of(cmd, env):
    """(exit code, stderr, peak RSS in MB of the command's largest process) - measured in a fresh
    wrapper process, so no earlier child of this test run counts."""
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(p.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(p.returncode)\n")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True,
                         timeout=120)
    return out.returncode, out.stderr, int(out.stdout.split()[-1]) / 1024


def test_a_53_mb_single_line_is_refused_in_bounded_memory(tmp_path, toks):
    """Issue 20: a 53 MB single-line .txt took 7.4 GB RSS. Now a record over --max-doc-bytes
    (8 MiB by default) is dropped while it is read: skipped as too_large, peak RSS of the run
    stays under 400 MB (tokenizing it took ~130 bytes of RSS per input byte)."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        for _ in range(53):
            f.write(b"word " * 200_000)  # 1 MB, no newline
    line = tmp_path / "line.jsonl"
    with open(line, "wb") as f:
        f.write(b'{"text": "' + b"x" * (20 << 20) + b'"}\n{"text": "a small document"}\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = [sys.executable, "-m", "megatron_vpmoe.cli", "preprocess", "--tokenizer", toks["bpe600"], "--no-progress"]
    rc, err, rss = _max_rss_mb_of(base + ["--input", str(big), str(line), "--output-prefix", str(tmp_path / "o")], env)
    assert rc == 0, err
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["documents"] == 1 and summary["skipped"] == {"too_large": 2}
    assert summary["first_skipped"]["too_large"] == [f"{big}:1", f"{line}:1"]
    assert rss < 400, rss
    # --txt-blocks reads the same line through the line reader; --strict makes it fatal, in one line
    rc, err, rss = _max_rss_mb_of(base + ["--input", str(big), "--txt-blocks", "--strict", "--output-prefix",
                                          str(tmp_path / "s")], env)
    assert rc == 2 and err.strip().count("\n") == 0 and f"{big}:1: too large (over --max-doc-bytes" in err, err
    assert rss < 400, rss
    assert _published(tmp_path, "s.") == []
