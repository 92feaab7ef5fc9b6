"""Preprocessing throughput: `vpmoe preprocess` vs Megatron-LM's own ``tools/preprocess_data.py``.

All pipelines read the same JSONL (the gutenberg_en blank-line documents) with the same
byte-level BPE (a ``tokenizers`` directory that ``transformers.AutoTokenizer`` also loads) and
the same worker count, and are timed end to end as the commands a user runs (process start
included), best of ``--trials`` (3) alternating runs:

- ``megatron-lm``: Megatron-LM's ``tools/preprocess_data.py`` at the tag matching the installed
  megatron-core (``core_v0.16.1``), ``--tokenizer-type HuggingFaceTokenizer``, run from a
  checkout given by ``--megatron-lm DIR`` (or ``$MEGATRON_LM``; nothing of it is in this
  project). Skipped, and said so in the results, without one.
- ``peer``: what that script does per document, written here (a ``multiprocessing.Pool`` maps
  encode over single documents, ``imap`` chunksize 25, the parent appends to megatron-core's
  ``IndexedDatasetBuilder``), for hosts without a Megatron-LM checkout.
- ``ours``: ``vpmoe preprocess``: the JSONL is cut into byte ranges at line starts (8 per worker);
  each worker process reads, parses, encodes (``encode_batch_fast``, one thread) and writes its
  ranges' shard files itself, and the parent only appends them in input order and writes the
  ``.idx`` (numpy only: no megatron-core/torch import, ~5 s of CPU in the other two).

The ``.bin`` files are compared byte for byte. Writes ``benchmarks/results/preprocess.{json,md}``.

    python benchmarks/preprocess.py [--mb 20] [--workers 2] [--trials 3] [--megatron-lm DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from megatron_vpmoe.data.shards import token_dtype  # noqa: E402
from megatron_vpmoe.data.sources import iter_documents  # noqa: E402
from megatron_vpmoe.tokenizers import load_tokenizer, train_tokenizer  # noqa: E402

_TOK = None


def _init(path):
    global _TOK
    _TOK = load_tokenizer(path)


def _encode_one(text):
    return _TOK.encode(text) + [_TOK.eod_id]


def peer(jsonl, tok_dir, prefix, workers):
    import numpy

    from megatron_vpmoe.utils.megatron_import import import_megatron

    tok = load_tokenizer(tok_dir)
    dtype = token_dtype(tok.vocab_size)
    builder = import_megatron("megatron.core.datasets.indexed_dataset").IndexedDatasetBuilder(
        prefix + ".bin", dtype=dtype)
    texts = (d.fields["text"] for d in iter_documents([Path(jsonl)], ["text"]) if hasattr(d, "fields"))
    tokens = 0
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(tok_dir,)) as pool:
        for ids in pool.imap(_encode_one, texts, 25):
            builder.add_document(numpy.array(ids, dtype=dtype), [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def _timed(cmd, env=None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20.0, help="MB of gutenberg_en text to process")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--trials", type=int, default=3, help="alternating runs per pipeline; the best counts")
    ap.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                    help="a Megatron-LM checkout at core_v0.16.1 (tools/preprocess_data.py), run as the peer")
    ap.add_argument("--_peer", nargs=4, metavar=("JSONL", "TOK", "PREFIX", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._peer:
        jsonl, tok_dir, prefix, workers = args._peer
        peer(jsonl, tok_dir, prefix, int(workers))
        return 0
    mlm = Path(args.megatron_lm).resolve() if args.megatron_lm else None
    if mlm is not None and not (mlm / "tools" / "preprocess_data.py").is_file():
        raise SystemExit(f"--megatron-lm {mlm}: no tools/preprocess_data.py there")
    corpus = sorted((ROOT.parent / "shared" / "data" / "corpora" / "gutenberg_en").glob("*.txt"))
    files, size = [], 0
    for f in corpus:
        if size >= args.mb * 1e6:
            break
        files.append(f)
        size += f.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer("bpe", [str(f) for f in files], args.vocab, max_bytes=5_000_000)
        tok_dir = str(tok.save(tmp / "tok"))
        jsonl = tmp / "docs.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for doc in iter_documents(files, ["text"], txt_blocks=True):
                if not hasattr(doc, "fields"):  # a skipped record (empty block)
                    continue
                f.write(json.dumps({"text": doc.fields["text"]}) + "\n")
        py = sys.executable
        commands = {
            "ours": lambda pre: [py, "-m", "megatron_vpmoe.cli", "preprocess", "--input", str(jsonl),
                                 "--output-prefix", pre, "--tokenizer", tok_dir, "--workers", str(args.workers),
                                 "--no-progress"],
            "peer": lambda pre: [py, str(Path(__file__).resolve()), "--_peer", str(jsonl), tok_dir,
                                 pre + "_text_document", str(args.workers)],
        }
        outputs = {"ours": lambda pre: pre + ".tok_text_document.bin", "peer": lambda pre: pre + "_text_document.bin"}
        env = {"ours": None, "peer": None}
        if mlm is not None:
            commands["megatron-lm"] = lambda pre: [
                py, str(mlm / "tools" / "preprocess_data.py"), "--input", str(jsonl), "--output-prefix", pre,
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                "--workers", str(args.workers), "--append-eod", "--log-interval", "1000000"]
            outputs["megatron-lm"] = lambda pre: pre + "_text_document.bin"
            env["megatron-lm"] = dict(os.environ, PYTHONPATH=str(mlm))
        seconds = {name: [] for name in commands}
        load_before = os.getloadavg()[0]
        for trial in range(args.trials):  # alternate, keep the best of each
            for name, command in commands.items():
                seconds[name].append(_timed(command(str(tmp / f"{name}{trial}")), env[name]))
        ours_bin = Path(outputs["ours"](str(tmp / "ours0"))).read_bytes()
        identical = {name: Path(outputs[name](str(tmp / f"{name}0"))).read_bytes() == ours_bin
                     for name in commands if name != "ours"}
        tokens = len(ours_bin) // token_dtype(tok.vocab_size)().itemsize
    best = {name: min(values) for name, values in seconds.items()}
    rate = {name: round(tokens / best[name]) for name in best}
    result = {"input_mb": round(size / 1e6, 2), "files": len(files), "workers": args.workers, "vocab": args.vocab,
              "trials": args.trials, "tokens": tokens, "seconds": seconds, "tokens_per_s": rate,
              # other work on the host skews every pipeline (1-minute load averages around the timing)
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "identical_bin_to_ours": identical,
              "megatron_lm": str(mlm) if mlm else "not run (no --megatron-lm checkout given)",
              "speedup_vs_megatron_lm": round(best["megatron-lm"] / best["ours"], 2) if mlm else None,
              "speedup_vs_peer": round(best["peer"] / best["ours"], 2)}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    labels = {"megatron-lm": "Megatron-LM `tools/preprocess_data.py` (core_v0.16.1, HuggingFaceTokenizer)",
              "peer": "Megatron-LM-style peer written here (Pool.imap per document + IndexedDatasetBuilder)",
              "ours": "`vpmoe preprocess`"}
    lines = ["# Preprocessing throughput (`benchmarks/preprocess.py`)", "",
             f"{result['input_mb']} MB of gutenberg_en ({len(files)} files, blank-line documents as one JSONL), "
             f"byte-level BPE {args.vocab}, {args.workers} workers, 2 CPU cores; each pipeline timed end to end as "
             f"a command (process start included), best of {args.trials} alternating runs.", "",
             "| pipeline | seconds | tokens/s | .bin identical to ours |", "|---|---|---|---|"]
    for name in ("megatron-lm", "peer", "ours"):
        if name in best:
            same = "-" if name == "ours" else str(identical[name])
            lines.append(f"| {labels[name]} | {best[name]:.1f} | {rate[name]:,} | {same} |")
    lines.append("")
    if mlm:
        lines.append(f"Speed-up over Megatron-LM: {result['speedup_vs_megatron_lm']}x (target 2x); over the "
                     f"per-document peer: {result['speedup_vs_peer']}x.")
    else:
        lines.append(f"Megatron-LM itself not run (no checkout given); speed-up over the per-document peer: "
                     f"{result['speedup_vs_peer']}x (target 2x against Megatron-LM).")
    lines.append("")
    (out / "preprocess.json").write_text(json.dumps(result, indent=2))
    (out / "preprocess.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
