"""tools/preprocess_data.py as a Megatron-LM drop-in: its flags, names, empty documents, merge, refusals.

The cases mirror what Megatron-LM's own ``tests/unit_tests/data/test_preprocess_data.py`` checks
(round trip of every line through build, merge and decode) and add byte-identity against
megatron-core's ``IndexedDatasetBuilder`` fed the way Megatron-LM's script feeds it; they are
written here and need no Megatron-LM checkout.
"""

import base64
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy
import pytest

from megatron_vpmoe.data.shards import read_shard
from megatron_vpmoe.tokenizers import train_tokenizer
from helpers.paths import ROOT as REPO_ROOT

ROOT = str(REPO_ROOT)
MEGATRON_LM = os.environ.get("MEGATRON_LM", os.path.join(os.path.dirname(ROOT), "megatron-lm"))
# text for the SentencePiece/TikTokenizer cases: specials of both inside text, spaces, empty and blank
TEXTS = ["Hello  world </s> <s> <unk>\n\nx", "", "\n", "   ", "zZ First Citizen: ABC abc DEF 123 4567 don't camelCase HTTPServer a/\n",
         "héllo wörld 日本語 😀 <SPECIAL_17> <mask>\ttab", "  leading and trailing  "]


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
    (["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", "v.txt"],
     "--tokenizer-type BertWordPieceLowerCase: not supported by this tool"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "nowhere.model"],
     "--tokenizer-model nowhere.model: file not found"),
    (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "SP", "--tokenizer-sentencepiece-legacy"],
     "--tokenizer-sentencepiece-legacy: not supported by this tool"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "TT", "--vocab-size", "99999"],
     "--vocab-size 99999: "),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "TT", "--tokenizer-special-tokens", "<s>", "</s>"],
     "--tokenizer-special-tokens: must include <unk> <s> </s> <mask> <pad> <cls> <sep>"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "BADJSON"],
     "entry 0 must be the single byte 0"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "openai-community/gpt2"],
     "--tokenizer-model openai-community/gpt2: not a local directory"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "nowhere/vocab.json", "--merge-file", "m.txt"],
     "--vocab-file nowhere/vocab.json: file not found"),
    (["TOK", "--split-sentences", "--lang", "nolanguage"], "--split-sentences: NLTK's punkt model "
                                                           "tokenizers/punkt_tab/nolanguage/ is not installed"),
    (["TOK", "--split-sentences", "--keep-newlines"], "--keep-newlines: not supported by this tool"),
    (["TOK", "--find-optimal-num-workers"], "--find-optimal-num-workers: not supported here"),
])
def test_unsupported_flags_are_one_line_exit_2(tmp_path, tok_dir, cache, capsys, flags, message, sp_model,
                                               tt_vocab):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    if flags[0] == "TOK":
        flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir] + flags[1:]
    bad = tmp_path / "bad.json"  # Megatron-LM's format, but the first ranks are not the 256 bytes in order
    bad.write_text(json.dumps([{"rank": 0, "token_bytes": base64.b64encode(b"!").decode(), "token_str": "!"}]))
    paths = {"SP": str(sp_model), "TT": str(tt_vocab["json"]), "BADJSON": str(bad)}
    flags = [paths.get(f, f) for f in flags]
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


# ---- SentencePiece and TikTokenizer types (Megatron-LM's ids, reproduced with their libraries) ----

def _train_ranks(text: str, merges: int) -> dict:
    """A tiny byte-level BPE in tiktoken's terms: the 256 bytes in order, then merges by count."""
    words = collections.Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    ranks = {bytes([i]): i for i in range(256)}
    split = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in zip(split[w], split[w][1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w in words:
            parts, out, i = split[w], [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    return ranks


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, shared_data):
    import sentencepiece

    out = tmp_path_factory.mktemp("sp")
    (out / "train.txt").write_text((shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:100_000])
    sentencepiece.SentencePieceTrainer.train(input=str(out / "train.txt"), model_prefix=str(out / "sp300"),
                                             vocab_size=300, model_type="bpe", minloglevel=2)
    return out / "sp300.model"


@pytest.fixture(scope="module")
def tt_vocab(tmp_path_factory, shared_data):
    """The same vocabulary as Megatron-LM's TikTokenizer JSON and as a .tiktoken ranks file."""
    out = tmp_path_factory.mktemp("tt")
    ranks = _train_ranks((shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:30_000], 150)
    ranks[b"zZ"] = len(ranks)  # one token under v1's split ("zZ" a word); v2 splits it at the case change
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    (out / "tt.json").write_text(json.dumps([{"rank": r, "token_bytes": base64.b64encode(t).decode(),
                                              "token_str": t.decode("utf-8", "replace")} for t, r in ordered]))
    (out / "tt.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ordered))
    return {"json": out / "tt.json", "tiktoken": out / "tt.tiktoken", "ranks": ranks}


@pytest.fixture(scope="module")
def punkt_data(tmp_path_factory, shared_data):
    """An NLTK data folder with a punkt_tab model "english" trained here (NLTK's own is not
    downloadable offline)."""
    import shutil

    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

    trainer = PunktTrainer()
    trainer.train((shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:100_000], finalize=True)
    staged = save_punkt_params(trainer.get_params())  # NLTK writes only inside its sandbox
    root = tmp_path_factory.mktemp("nltk_data")
    target = root / "tokenizers" / "punkt_tab" / "english"
    shutil.copytree(staged, target)
    shutil.rmtree(staged, ignore_errors=True)
    return root


def _documents(prefix) -> list:
    """Per document, its ids (an empty document has no sequence: [])."""
    ds = read_shard(str(prefix))
    seqs, out = [ds[i].tolist() for i in range(len(ds))], []
    bounds = ds.document_indices.tolist()
    for a, b in zip(bounds, bounds[1:]):
        out.append([t for s in seqs[a:b] for t in s])
    return out, ds.index.dtype


def _run_tool(tmp_path, name, flags, texts=TEXTS, level="document"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = tmp_path / "out" / name
    assert _tool().main(["--input", str(src), "--output-prefix", str(prefix), "--append-eod", "--no-progress",
                         "--workers", "1"] + flags) == 0
    return tmp_path / "out" / f"{name}_text_{level}"


SENTENCES = ["First sentence here. Second one, Mr. Smith? Yes!\n\nNew para.  And more", "", "\n",
             "One sentence only", "A. B. C. D.", "Is it?  " * 3]


def test_split_sentences_gives_megatron_lm_structure(tmp_path, cache, sp_model, punkt_data, monkeypatch):
    """--split-sentences: every non-empty sentence (punkt, from local data) a sequence of its
    document, EOD counted in the last; a document without sentences has none; the output is
    {prefix}_{key}_sentence and nothing else."""
    import nltk
    import sentencepiece
    from nltk.tokenize import PunktTokenizer

    monkeypatch.setattr(nltk.data, "path", [str(punkt_data)] + list(nltk.data.path))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    prefix = _run_tool(tmp_path, "s", ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                       str(sp_model), "--split-sentences"], SENTENCES, level="sentence")
    assert sorted(os.listdir(prefix.parent)) == ["s_text_sentence.bin", "s_text_sentence.idx"]
    split = PunktTokenizer("english").tokenize
    sequences, bounds = [], [0]
    for text in SENTENCES:
        ids = [sp.encode(s) for s in split(text)]
        ids = [x for x in ids if x]
        if ids:
            ids[-1] = ids[-1] + [sp.eos_id()]
        sequences += ids
        bounds.append(len(sequences))
    ds = read_shard(str(prefix))
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    assert ds.document_indices.tolist() == bounds
    assert bounds[1] - bounds[0] >= 4 and bounds[2] == bounds[1]  # several sentences; "" has none


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_sentencepiece_types_give_megatron_lm_ids(tmp_path, cache, sp_model, kind):
    """Megatron-LM's SentencePiece wrapper (non-legacy, its default) for all three types: the
    processor's ``encode`` (no BOS, ``</s>``/``<s>`` in text as plain text), EOS as EOD on
    non-empty documents, the piece count as vocabulary size."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    docs, dtype = _documents(_run_tool(tmp_path, "sp", ["--tokenizer-type", kind, "--tokenizer-model", str(sp_model)]))
    expected = [ids + [sp.eos_id()] if ids else [] for ids in (sp.encode(t) for t in TEXTS)]
    assert docs == expected and dtype == numpy.uint16
    # "" and blank texts have no pieces (the model's normalizer drops whitespace): documents of no sequence
    assert expected[1] == expected[3] == [] and expected[0] and len(docs) == len(TEXTS)
    assert sp.bos_id() not in [t for d in docs for t in d]


def test_tiktokenizer_gives_megatron_lm_ids(tmp_path, cache, tt_vocab):
    """Megatron-LM's TikTokenizer: specials take ids 0..N-1 (``</s>``, the EOD, is 2), ranks shift
    by N, the vocabulary is cut to --vocab-size - N, special strings in text are their ids; the
    JSON vocabulary and the .tiktoken file of the same ranks agree; v1 and v2 split differently."""
    import tiktoken

    from megatron_vpmoe.tokenizers.megatron_flags import TIKTOKEN_PATTERNS

    n_ranks = len(tt_vocab["ranks"])
    out = {}
    for name, fmt, pattern, vocab_size, num_special in (
            ("v2json", "json", "v2", n_ranks + 1000, 1000), ("v2tik", "tiktoken", "v2", n_ranks + 1000, 1000),
            ("v1", "json", "v1", n_ranks + 1000, 1000), ("cut", "tiktoken", "v2", 300, 20)):
        flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(tt_vocab[fmt]), "--tiktoken-pattern",
                 pattern, "--vocab-size", str(vocab_size), "--tiktoken-num-special-tokens", str(num_special)]
        docs, dtype = _documents(_run_tool(tmp_path / name, name, flags))
        specials = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
        ranks = {t: r + num_special for t, r in tt_vocab["ranks"].items() if r < vocab_size - num_special}
        ref = tiktoken.Encoding(name=f"ref{name}", pat_str=TIKTOKEN_PATTERNS[pattern], mergeable_ranks=ranks,
                                special_tokens={t: i for i, t in enumerate(specials)})
        expected = [ids + [2] if ids else [] for ids in (ref.encode(t, allowed_special="all") for t in TEXTS)]
        assert docs == expected, name
        assert dtype == numpy.uint16 and max(max(d) for d in docs if d) < vocab_size
        out[name] = docs
    assert out["v2json"] == out["v2tik"]
    assert out["v1"][4][0] == 1000 + tt_vocab["ranks"][b"zZ"] and out["v2json"][4][:2] == [1000 + ord("z"), 1000 + ord("Z")]
    assert 17 in out["v2json"][5] and 3 in out["v2json"][5]  # <SPECIAL_17> and <mask> inside text
    assert out["cut"] != out["v2json"]  # the cut vocabulary splits words into more tokens


def test_tiktokenizer_on_o200k_ranks(tmp_path, cache, o200k):
    """A .tiktoken file (o200k) with Megatron-LM's defaults: 131072 ids, 1000 specials first."""
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(str(o200k))
    prefix = _run_tool(tmp_path, "o", ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(o200k)])
    docs, dtype = _documents(prefix)
    assert dtype == numpy.int32  # 131072 ids
    # "First Citizen" splits alike under o200k's and Megatron's v2 patterns; its tokens are low ranks
    assert docs[4][2:5] == [ranks[b" First"] + 1000, ranks[b" Citizen"] + 1000, ranks[b":"] + 1000]
    assert docs[0][-1] == 2 and max(max(d) for d in docs if d) < 131072


@pytest.mark.long
@pytest.mark.skipif(not os.path.isfile(os.path.join(MEGATRON_LM, "tools", "preprocess_data.py")),
                    reason="no Megatron-LM checkout beside the project (or $MEGATRON_LM)")
def test_sentencepiece_and_tiktokenizer_bytes_equal_megatron_lm_own_tool(tmp_path, cache, sp_model, tt_vocab):
    """Megatron-LM's own tools/preprocess_data.py against ours: the same flags, the same bytes."""
    shim = tmp_path / "shim"  # Megatron-LM wants Python >= 3.12 only for typing.override
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import typing\nimport typing_extensions\nif not hasattr(typing, 'override'):"
                                           "\n    typing.override = typing_extensions.override\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), MEGATRON_LM]))
    n_ranks = len(tt_vocab["ranks"])
    cases = {
        "sp": ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(sp_model)],
        "ttv1": ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(tt_vocab["json"]), "--tiktoken-pattern",
                 "v1", "--vocab-size", str(n_ranks + 1000)],
        "ttcut": ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(tt_vocab["json"]),
                  "--vocab-size", "300", "--tiktoken-num-special-tokens", "20", "--tokenizer-special-tokens",
                  "<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>", "<|x|>"],
    }
    for name, flags in cases.items():
        ours = _run_tool(tmp_path / name, name, flags)
        _megatron_lm_tool(tmp_path / name, flags, env)
        for ext in (".bin", ".idx"):
            assert (tmp_path / name / f"megatron_text_document{ext}").read_bytes() == \
                ours.with_name(ours.name + ext).read_bytes(), (name, ext)


def _megatron_lm_tool(folder, flags, env):
    run = subprocess.run([sys.executable, os.path.join(MEGATRON_LM, "tools", "preprocess_data.py"), "--input",
                          str(folder / "in.jsonl"), "--output-prefix", str(folder / "megatron"), "--append-eod",
                          "--workers", "1"] + flags, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.long
@pytest.mark.skipif(not os.path.isfile(os.path.join(MEGATRON_LM, "tools", "preprocess_data.py")),
                    reason="no Megatron-LM checkout beside the project (or $MEGATRON_LM)")
def test_split_sentences_bytes_equal_megatron_lm_own_tool(tmp_path, cache, sp_model, punkt_data, monkeypatch):
    """Megatron-LM's --split-sentences (its first run writes in_ss.jsonl, the second encodes it;
    it finds punkt_tab under ~/nltk_data: with NLTK_DATA set it asks for a pickle NLTK >= 3.9 no
    longer loads) against ours in one run: the same bytes."""
    import shutil

    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(punkt_data)] + list(nltk.data.path))
    home = tmp_path / "home"
    shutil.copytree(punkt_data, home / "nltk_data")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import typing\nimport typing_extensions\nif not hasattr(typing, 'override'):"
                                           "\n    typing.override = typing_extensions.override\n")
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(shim), MEGATRON_LM]))
    flags = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(sp_model), "--split-sentences"]
    ours = _run_tool(tmp_path, "s", flags, SENTENCES, level="sentence")
    for _ in range(2):
        _megatron_lm_tool(tmp_path, flags, env)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"megatron_text_sentence{ext}").read_bytes() == ours.with_name(ours.name + ext).read_bytes()
