"""tools/preprocess_data.py as a Megatron-LM drop-in: its flags, names, empty documents, merge, refusals.

The cases mirror what Megatron-LM's own ``tests/unit_tests/data/test_preprocess_data.py`` checks
(round trip of every line through build, merge and decode) and add byte-identity against
megatron-core's ``IndexedDatasetBuilder`` fed the way Megatron-LM's script feeds it; they are
written here and need no Megatron-LM checkout.
"""

import importlib.util
import json
import os

import numpy
import pytest

from megatron_vpmoe.data.shards import read_shard
from megatron_vpmoe.tokenizers import train_tokenizer
from helpers.paths import ROOT as REPO_ROOT

ROOT = str(REPO_ROOT)


def _tool():
    spec = importlib.util.spec_from_file_location("vpmoe_preprocess_data", os.path.join(ROOT, "tools",
                                                                                          "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("dropin")
    corpus = str(shared_data / "corpora" / "tinyshakespeare.txt")
    return str(train_tokenizer("bpe", [corpus], 600, max_bytes=150_000).save(out / "bpe600"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VPMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _raw_inputs(folder):
    """Numbers, ascending number runs, and the lines of a source file (blank lines are "\\n"
    documents), plus empty and whitespace-only texts."""
    folder.mkdir()
    files = {
        "numbers": [str(i + 1) for i in range(100)],
        "numbers_ascending": [" ".join(str(j + 1) for j in range(i + 1)) for i in range(100)],
        "lines": open(__file__, encoding="utf-8").readlines() + ["", "   \t ", "\n\n", "héllo 😀 日本"],
    }
    for name, texts in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return files


def test_build_merge_and_round_trip_every_line(tmp_path, tok_dir, cache):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    tool = _tool()
    raws, data = tmp_path / "raws", tmp_path / "data"
    files = _raw_inputs(raws)
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--append-eod",
             "--log-interval", "1", "--no-progress"]
    for i, name in enumerate(sorted(files)):
        workers = ["--workers", str(1 + i % 2)]
        assert tool.main(["--input", str(raws / f"{name}.jsonl"), "--output-prefix", str(data / name)]
                         + flags + workers) == 0
    # Megatron-LM's names and nothing else (its merge_datasets.py --input DIR takes every file)
    assert sorted(os.listdir(data)) == sorted(f"{n}_text_document.{e}" for n in files for e in ("bin", "idx"))
    # merged the way Megatron-LM's tools/merge_datasets.py does, with megatron-core
    prefixes = sorted({os.path.splitext(n)[0] for n in os.listdir(data)})
    merged = IndexedDatasetBuilder(str(tmp_path / "merge.bin"), dtype=IndexedDataset(str(data / prefixes[0])).index.dtype)
    for p in prefixes:
        merged.add_index(str(data / p))
    merged.finalize(str(tmp_path / "merge.idx"))
    merged_ds = IndexedDataset(str(tmp_path / "merge"))

    args = tool.get_args(["--input", "x", "--output-prefix", "y"] + flags)
    encoder = tool.Encoder(args)
    encoder.initializer()
    decode = encoder.tokenizer.decode
    m = 0
    for p in prefixes:
        name = p[: -len("_text_document")]
        ds = IndexedDataset(str(data / p))
        assert len(ds.document_indices) - 1 == len(files[name])  # every line is a document, empty ones too
        s = 0
        for text in files[name]:
            ids, lens, _ = encoder.encode(json.dumps({"text": text}))
            ids = ids["text"]
            got = []
            for _ in lens["text"]:
                got.extend(ds[s].tolist())
                s += 1
            merged_got = []
            for _ in lens["text"]:
                merged_got.extend(merged_ds[m].tolist())
                m += 1
            assert got == ids == merged_got, (name, text)
            assert decode(got[:-1] if got else got) == text  # the EOD follows every non-empty document
            assert (not got) == (text == "")  # "" is a document of no sequence; whitespace is kept
    assert m == len(merged_ds)


def test_bytes_equal_megatron_core_builder_fed_as_megatron_lm_feeds_it(tmp_path, tok_dir, cache):
    """Megatron-LM's loop: ids from transformers' AutoTokenizer (its HuggingFaceTokenizer), EOD on
    non-empty documents, ``add_document(ids, [len])`` or ``([], [])`` for an empty one."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    tool = _tool()
    files = _raw_inputs(tmp_path / "raws")
    src = tmp_path / "raws" / "lines.jsonl"
    assert tool.main(["--input", str(src), "--output-prefix", str(tmp_path / "out" / "x"), "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--append-eod", "--workers", "2",
                      "--no-progress"]) == 0
    hf = AutoTokenizer.from_pretrained(tok_dir)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(len(hf)))
    for text in files["lines"]:
        ids = hf(text, add_special_tokens=False).input_ids
        if ids:
            ids = ids + [hf.eos_token_id]
        ref.add_document(numpy.array(ids, dtype=numpy.int64), [len(ids)] if ids else [])
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ref{ext}").read_bytes() == (tmp_path / "out" / f"x_text_document{ext}").read_bytes(), ext
    # a re-run is up to date and still leaves nothing but the pair in the folder
    assert tool.main(["--input", str(src), "--output-prefix", str(tmp_path / "out" / "x"), "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--append-eod", "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["x_text_document.bin", "x_text_document.idx"]
    assert len(list((cache / "preprocess").glob("*.summary.json"))) == 1


def test_gpt2_bpe_vocab_and_merge_files(tmp_path, shared_data, cache):
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train([str(shared_data / "corpora" / "tinyshakespeare.txt")], vocab_size=400,
                  special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(str(tmp_path))  # vocab.json + merges.txt, GPT-2's files
    src = tmp_path / "in.jsonl"
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "  two  spaces", "x"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert _tool().main(["--input", str(src), "--output-prefix", str(tmp_path / "out" / "g"), "--tokenizer-type",
                         "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "vocab.json"), "--merge-file",
                         str(tmp_path / "merges.txt"), "--append-eod", "--no-progress"]) == 0
    reference = ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    eod = reference.token_to_id("<|endoftext|>")
    ds = read_shard(str(tmp_path / "out" / "g_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [reference.encode(t).ids + [eod] for t in texts]


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "m.model"],
     "--tokenizer-type SentencePieceTokenizer: not supported by this tool"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "openai-community/gpt2"],
     "--tokenizer-model openai-community/gpt2: not a local directory"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "nowhere/vocab.json", "--merge-file", "m.txt"],
     "--vocab-file nowhere/vocab.json: file not found"),
    (["TOK", "--split-sentences", "--lang", "nolanguage"], "--split-sentences needs NLTK's punkt model "
                                                           "tokenizers/punkt/nolanguage.pickle"),
    (["TOK", "--find-optimal-num-workers"], "--find-optimal-num-workers: not supported here"),
])
def test_unsupported_flags_are_one_line_exit_2(tmp_path, tok_dir, cache, capsys, flags, message):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    if flags[0] == "TOK":
        flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir] + flags[1:]
    code = _tool().main(["--input", str(src), "--output-prefix", str(tmp_path / "out" / "x")] + flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_one_rule_for_special_token_strings_in_text(tmp_path, tok_dir, cache):
    """Every special token inside text: the same ids from our encoder, `vpmoe preprocess`, the
    exported HF tokenizer (AutoTokenizer, what Megatron-LM's HuggingFaceTokenizer loads) and
    this drop-in: each string becomes its special id."""
    from transformers import AutoTokenizer

    from megatron_vpmoe.data.preprocess import PreprocessOptions, run_preprocess
    from megatron_vpmoe.tokenizers import load

    tok = load(tok_dir)
    specials = sorted(tok.special_tokens)
    text = "x " + " mid ".join(specials) + " y" + "".join(specials)
    ours = tok.encode(text)
    assert [i for i in ours if i in tok.special_tokens.values()] == \
        [tok.token_to_id(s) for s in specials] * 2
    assert AutoTokenizer.from_pretrained(tok_dir)(text, add_special_tokens=False).input_ids == ours
    assert tok.encode_batch([text]) == [ours]  # the fast engine, when in use
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n")
    run_preprocess(PreprocessOptions(inputs=[str(src)], output_prefix=str(tmp_path / "v"), tokenizers={"t": tok_dir},
                                     progress=False))
    assert _tool().main(["--input", str(src), "--output-prefix", str(tmp_path / "m" / "d"), "--tokenizer-type",
                         "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--append-eod", "--no-progress"]) == 0
    for prefix in (tmp_path / "v.t_text_document", tmp_path / "m" / "d_text_document"):
        ds = read_shard(str(prefix))  # held: its items are views of the memory map
        assert len(ds) == 1 and ds[0].tolist() == ours + [tok.eod_id], prefix
