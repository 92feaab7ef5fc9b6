"""Preprocessing: `vpmoe preprocess` against Megatron-LM's ``preprocess_data.py`` and ``preprocess_data_fast.py``.

Every pipeline is timed end to end as the command a user runs (process start included), best of
``--trials`` (3) runs alternating between pipelines, with the peak resident memory of its whole
process tree (sampled every 20 ms, :mod:`megatron_vpmoe.utils.proc_tree`). Inputs:

- ``gutenberg``: the gutenberg_en books' blank-line blocks as one JSONL (~20 MB, 2 KB documents);
- ``distinct``: >= ``--distinct-mb`` (62) MB of distinct documents (no repeats: encode caches
  would flatter every pipeline): every text under ``../shared/data`` except ``eval/``
  (gutenberg_en and multilingual blocks, tinyshakespeare blocks, the CPython stdlib files of
  code_python, the kd/ records' fields, the Harmony fixtures; ~52 MB as JSONL) topped up with
  the test modules of the local CPython install (``Lib/test``, one document per file);
- ``synthetic`` (``--synthetic-gb``, memory only): the distinct corpus repeated, each copy's
  documents prefixed with its number, through ``vpmoe preprocess`` alone.

Tokenizers: byte-level BPE-32k and Length-MAX-32k trained here on gutenberg_en (5 MB), the same
``tokenizer.json`` directory for all pipelines. Pipelines: ``vpmoe preprocess --workers N``;
Megatron-LM ``tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --workers N`` from
``--megatron-lm DIR`` (a release checkout); Megatron-LM ``tools/preprocess_data_fast.py
--use-gigatoken`` from ``--megatron-lm-fast DIR`` (the tool is on Megatron-LM's main branch
only), with ``--gigatoken-path DIR`` (the upstream ``gigatoken`` package, installed with ``pip
install --target DIR gigatoken``) first on its path. Megatron-LM requires Python >= 3.12; on an
older interpreter a ``sitecustomize`` here adds ``typing.override`` from typing_extensions, its
only 3.12 need on these paths. Multi-variant: BPE and Length-MAX in one pass against each alone.
``.bin``/``.idx`` are compared byte for byte. Every run also records the CPU seconds (user + sys)
of its process tree: on a shared host the multi-variant ratio in CPU time is the one other work
does not distort. Writes ``benchmarks/results/preprocess.{json,md}``; ``--multi-variant-only``
runs only the three multi-variant pipelines on the distinct input, more trials allowed, and writes
``benchmarks/results/preprocess_multi_variant.{json,md}``.

    python benchmarks/preprocess.py --megatron-lm DIR --megatron-lm-fast DIR --gigatoken-path DIR
    python benchmarks/preprocess.py --multi-variant-only --trials 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from megatron_vpmoe.data.sources import iter_documents  # noqa: E402
from megatron_vpmoe.tokenizers import train_tokenizer  # noqa: E402
from megatron_vpmoe.utils.atomic import atomic_write_text  # noqa: E402
from megatron_vpmoe.utils.proc_tree import run_measured  # noqa: E402


def write_results(stem: str, result: dict, lines: list) -> None:
    """``benchmarks/results/<stem>.json`` and ``.md``, each written whole or not at all; the table printed."""
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

SHARED = ROOT.parent / "shared" / "data"
SHIM = ("import typing\nimport typing_extensions\n"
        "if not hasattr(typing, 'override'):\n    typing.override = typing_extensions.override\n")


def _blocks(files):
    for doc in iter_documents(files, ["text"], txt_blocks=True):
        if hasattr(doc, "fields"):
            yield doc.fields["text"]


def gutenberg(path: Path, mb: float) -> int:
    files, size = [], 0
    for f in sorted((SHARED / "corpora" / "gutenberg_en").glob("*.txt")):
        if size >= mb * 1e6:
            break
        files.append(f)
        size += f.stat().st_size
    with open(path, "w", encoding="utf-8") as out:
        for text in _blocks(files):
            out.write(json.dumps({"text": text}) + "\n")
    return path.stat().st_size


def _distinct_texts():
    yield from _blocks(sorted((SHARED / "corpora" / "gutenberg_en").glob("*.txt")))
    yield from _blocks(sorted((SHARED / "corpora" / "multilingual").glob("*.txt")))
    yield from _blocks([SHARED / "corpora" / "tinyshakespeare.txt"])
    for f in sorted((SHARED / "corpora" / "code_python").rglob("*.py")):
        yield f.read_text(encoding="utf-8", errors="replace")
    for f in sorted((SHARED / "kd").glob("*.jsonl")):
        for line in open(f, encoding="utf-8"):
            record = json.loads(line)
            yield "\n\n".join(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in record.values())
    for f in sorted((SHARED / "harmony" / "fixtures").glob("*")):
        if f.is_file():
            yield f.read_text(encoding="utf-8", errors="replace")
    import sysconfig

    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").rglob("*.py")):
        yield f.read_text(encoding="utf-8", errors="replace")


def distinct(path: Path, mb: float) -> dict:
    seen, docs, shared_bytes = set(), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        for text in _distinct_texts():
            digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
            if digest in seen or not text.strip():
                continue
            seen.add(digest)
            out.write(json.dumps({"text": text}) + "\n")
            docs += 1
            if out.tell() >= mb * 1e6:
                break
    size = path.stat().st_size
    if size < mb * 1e6:
        raise SystemExit(f"only {size / 1e6:.1f} MB of distinct documents found (wanted {mb})")
    return {"bytes": size, "documents": docs}


def synthetic(path: Path, source: Path, gb: float) -> int:
    copy = 0
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < gb * 1e9:
            with open(source, encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    out.write(json.dumps({"text": f"copy {copy}\n{text}"}) + "\n")
            copy += 1
    return path.stat().st_size


def measure(cmd, env=None):
    """``({seconds, cpu_seconds, peak_rss_mb}, completed process)``; CPU of the whole (reaped) process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak, out = run_measured(cmd, env=env, cwd=str(ROOT))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(peak / 2**20)}, out


def train_tokenizers(tmp: Path) -> dict:
    corpus = [str(f) for f in sorted((SHARED / "corpora" / "gutenberg_en").glob("*.txt"))]
    return {kind: str(train_tokenizer(kind, corpus, 32000, max_bytes=5_000_000).save(tmp / f"{kind}-32k"))
            for kind in ("bpe", "lengthmax")}


def ours_command(toks: dict, variants, workers: int):
    return lambda src, pre: ([sys.executable, "-m", "megatron_vpmoe.cli", "preprocess", "--input", str(src),
                              "--output-prefix", pre, "--workers", str(workers), "--no-progress",
                              "--tokenizer", *[f"{v}={toks[v]}" for v in variants]], None)


def multi_variant(args) -> int:
    """BPE alone, Length-MAX alone, both in one pass: alternating trials, best wall and best CPU."""
    runs = {"bpe": [], "lengthmax": [], "bpe+lengthmax": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        toks = train_tokenizers(tmp)
        meta = distinct(tmp / "distinct.jsonl", args.distinct_mb)
        load = [os.getloadavg()[0]]
        for trial in range(args.trials):
            for name in runs:
                cmd, env = ours_command(toks, name.split("+"), args.workers)(tmp / "distinct.jsonl",
                                                                              str(tmp / f"{name}-{trial}"))
                record, out = measure(cmd, env)
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                runs[name].append(record)
                print(name, trial, record, flush=True)
        load.append(os.getloadavg()[0])
    best = {n: {k: min(r[k] for r in rs) for k in ("seconds", "cpu_seconds")} for n, rs in runs.items()}
    ratio = {k: round(best["bpe+lengthmax"][k] / max(best["bpe"][k], best["lengthmax"][k]), 2)
             for k in ("seconds", "cpu_seconds")}
    result = {"bytes": meta["bytes"], "documents": meta["documents"], "workers": args.workers,
              "trials": args.trials, "runs": runs, "best": best, "ratio": ratio,
              "load_average_before_after": [round(x, 2) for x in load]}
    lines = ["# Multi-variant preprocessing (`benchmarks/preprocess.py --multi-variant-only`)", "",
             f"`vpmoe preprocess --workers {args.workers}` on the distinct input ({meta['bytes'] / 1e6:.1f} MB, "
             f"{meta['documents']} documents), best of {args.trials} alternating runs; wall time of the command "
             f"and CPU seconds (user + sys) of its process tree; load average {load[0]:.1f} -> {load[1]:.1f} "
             f"(2 shared cores: wall time is noisy, CPU time much less).", "",
             "| tokenizers | wall s | CPU s |", "|---|---|---|"]
    for name, b in best.items():
        lines.append(f"| {name} | {b['seconds']} | {b['cpu_seconds']} |")
    lines += ["", f"Both in one pass / the slower alone: {ratio['seconds']}x wall, {ratio['cpu_seconds']}x CPU."]
    write_results("preprocess_multi_variant", result, lines)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gutenberg-mb", type=float, default=20.0)
    ap.add_argument("--distinct-mb", type=float, default=62.0)
    ap.add_argument("--synthetic-gb", type=float, default=1.0, help="0: skip the memory run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"), help="release checkout")
    ap.add_argument("--megatron-lm-fast", default=os.environ.get("MEGATRON_LM_FAST"),
                    help="checkout with tools/preprocess_data_fast.py (main branch)")
    ap.add_argument("--gigatoken-path", default=None, help="upstream gigatoken (pip install --target DIR)")
    ap.add_argument("--multi-variant-only", action="store_true",
                    help="only BPE, Length-MAX and both in one pass, on the distinct input")
    args = ap.parse_args()
    if args.multi_variant_only:
        return multi_variant(args)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        toks = train_tokenizers(tmp)
        inputs = {"gutenberg": tmp / "gutenberg.jsonl", "distinct": tmp / "distinct.jsonl"}
        sizes = {"gutenberg": gutenberg(inputs["gutenberg"], args.gutenberg_mb)}
        meta = distinct(inputs["distinct"], args.distinct_mb)
        sizes["distinct"] = meta["bytes"]
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SHIM)

        def ours(variants):
            return ours_command(toks, variants, args.workers)

        pipelines = {"ours": ours(["bpe"])}
        outputs = {"ours": lambda pre: pre + ".bpe_text_document"}
        for name, checkout, tool, extra in (
                ("megatron-lm", args.megatron_lm, "preprocess_data.py", ["--workers", str(args.workers),
                                                                          "--log-interval", "100000000"]),
                ("megatron-lm-fast", args.megatron_lm_fast, "preprocess_data_fast.py", ["--use-gigatoken"])):
            if not checkout:
                continue
            path = [str(shim)] + ([args.gigatoken_path] if name.endswith("fast") and args.gigatoken_path else []) \
                + [str(Path(checkout).resolve())]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
            script = str(Path(checkout).resolve() / "tools" / tool)
            pipelines[name] = (lambda script, env, extra: lambda src, pre: (
                [py, script, "--input", str(src), "--output-prefix", pre, "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", toks["bpe"], "--append-eod"] + extra, env))(script, env, extra)
            outputs[name] = lambda pre: pre + "_text_document"
        runs = {(p, i): [] for p in pipelines for i in inputs}
        runs.update({("ours-bpe+lengthmax", "distinct"): [], ("ours-lengthmax", "distinct"): []})
        extra_runs = {"ours-bpe+lengthmax": ours(["bpe", "lengthmax"]), "ours-lengthmax": ours(["lengthmax"])}
        load = [os.getloadavg()[0]]
        for trial in range(args.trials):
            for inp in inputs:
                todo = dict(pipelines)
                if inp == "distinct":
                    todo.update(extra_runs)
                for name, make in todo.items():
                    cmd, env = make(inputs[inp], str(tmp / f"{name}-{inp}-{trial}"))
                    record, out = measure(cmd, env)
                    if out.returncode != 0:
                        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                    # each tool's own processing time, start-up excluded (steady state without the noise of imports)
                    own = re.search(r"Elapsed time: ([0-9.]+)|preprocessed .* in ([0-9.]+) s", out.stdout)
                    if own:
                        record["own_seconds"] = float(own.group(1) or own.group(2))
                    runs[(name, inp)].append(record)
                    print(name, inp, trial, runs[(name, inp)][-1], flush=True)
        load.append(os.getloadavg()[0])
        identical = {}
        for inp in inputs:
            ref = outputs["ours"](str(tmp / f"ours-{inp}-0"))
            for name in pipelines:
                if name != "ours":
                    other = outputs[name](str(tmp / f"{name}-{inp}-0"))
                    identical[f"{name}/{inp}"] = all(Path(ref + e).read_bytes() == Path(other + e).read_bytes()
                                                     for e in (".bin", ".idx"))
        memory = None
        if args.synthetic_gb > 0:
            big = tmp / "synthetic.jsonl"
            size = synthetic(big, inputs["distinct"], args.synthetic_gb)
            for f in tmp.glob("*-*-[0-9]*"):
                f.unlink()
            cmd, env = pipelines["ours"](big, str(tmp / "synthetic"))
            record, out = measure(cmd, env)
            if out.returncode != 0:
                raise SystemExit(f"synthetic run failed:\n{out.stderr[-3000:]}")
            memory = {"bytes": size, **record}
            big.unlink()
    best = {f"{p}/{i}": min(r, key=lambda x: x["seconds"]) for (p, i), r in runs.items()}
    steady = {}
    for p in pipelines:
        dt = best[f"{p}/distinct"]["seconds"] - best[f"{p}/gutenberg"]["seconds"]
        steady[p] = round((sizes["distinct"] - sizes["gutenberg"]) / 1e6 / dt, 1) if dt > 0 else None
    result = {"sizes": sizes, "distinct_documents": meta["documents"], "workers": args.workers,
              "trials": args.trials, "runs": {f"{p}/{i}": r for (p, i), r in runs.items()}, "best": best,
              "steady_mb_per_s": steady, "identical_bin_idx_to_ours": identical, "synthetic": memory,
              "load_average_before_after": [round(x, 2) for x in load],
              "megatron_lm": args.megatron_lm, "megatron_lm_fast": args.megatron_lm_fast,
              "multi_variant_ratio": round(best["ours-bpe+lengthmax/distinct"]["seconds"] / max(
                  best["ours-lengthmax/distinct"]["seconds"], best["ours/distinct"]["seconds"]), 2),
              "multi_variant_cpu_ratio": round(min(r["cpu_seconds"] for r in runs[("ours-bpe+lengthmax", "distinct")])
                                               / max(min(r["cpu_seconds"] for r in runs[(p, "distinct")])
                                                     for p in ("ours-lengthmax", "ours")), 2)}
    lines = ["# Preprocessing (`benchmarks/preprocess.py`)", "",
             f"{args.workers} workers, 2 shared CPU cores, best of {args.trials} alternating runs, wall time of the "
             f"command (start-up included) and peak RSS of its process tree; load average {load[0]:.1f} -> "
             f"{load[1]:.1f} (other work on the host: noisy).", "",
             "| pipeline | gutenberg s | distinct s | steady MB/s | peak RSS MB (distinct) | .bin/.idx = ours |",
             "|---|---|---|---|---|---|"]
    for p in pipelines:
        same = "-" if p == "ours" else f"{identical[f'{p}/gutenberg']} / {identical[f'{p}/distinct']}"
        lines.append(f"| {p} | {best[f'{p}/gutenberg']['seconds']} | {best[f'{p}/distinct']['seconds']} | "
                     f"{steady[p]} | {best[f'{p}/distinct']['peak_rss_mb']} | {same} |")
    lines += ["", f"Inputs: gutenberg {sizes['gutenberg'] / 1e6:.1f} MB, distinct {sizes['distinct'] / 1e6:.1f} MB "
              f"({meta['documents']} documents).",
              f"Multi-variant (distinct): BPE+Length-MAX in one pass {best['ours-bpe+lengthmax/distinct']['seconds']} s, "
              f"Length-MAX alone {best['ours-lengthmax/distinct']['seconds']} s, BPE alone "
              f"{best['ours/distinct']['seconds']} s: {result['multi_variant_ratio']}x the slower one alone "
              f"({result['multi_variant_cpu_ratio']}x in CPU seconds of the process tree)."]
    if memory:
        lines.append(f"Synthetic {memory['bytes'] / 1e9:.2f} GB through `vpmoe preprocess` (BPE): {memory['seconds']} s, "
                     f"peak RSS of the process tree {memory['peak_rss_mb']} MB.")
    write_results("preprocess", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
