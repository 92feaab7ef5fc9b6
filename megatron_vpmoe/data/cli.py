"""``vpmoe preprocess``: tokenize corpora into Megatron .bin/.idx shards; ``merge``; ``inspect``."""

from __future__ import annotations

import argparse

from megatron_vpmoe.data.memory_plan import DEFAULT_MAX_MEMORY_MB
from megatron_vpmoe.data.sources import DEFAULT_MAX_DOC_BYTES

EXAMPLE = ("Example: vpmoe preprocess --input '../shared/data/corpora/gutenberg_en/*.txt' "
           "--output-prefix runs/shards/gutenberg --tokenizer runs/tok/bpe-32k runs/tok/lm-32k --workers 2")


def add_preprocess_arguments(parser: argparse.ArgumentParser, *, required: bool, append_eod: bool = True) -> None:
    """The preprocessing flags (Megatron-LM's names where it has them); shared with tools/preprocess_data.py."""
    parser.add_argument("--input", nargs="+", required=required, metavar="FILE_DIR_OR_GLOB",
                        help=".jsonl[.gz|.zst], .parquet, .txt files, directories or globs")
    parser.add_argument("--output-prefix", required=required, metavar="PREFIX",
                        help="shards are PREFIX.{variant}_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer", nargs="+", default=[], metavar="DIR_OR_NAME=DIR",
                        help="one or more tokenizer directories (vpmoe tokenizer train/get); one shard "
                             "set per variant from a single pass; the variant name is the directory name")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="fields to tokenize (dotted paths reach nested objects); a field holding "
                             "chat messages (or Harmony text) also gets a loss-mask dataset (default: text)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=append_eod,
                        help="end every document with the tokenizer's EOD id "
                             f"(default: {'on' if append_eod else 'off'})")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes that each read, tokenize (one thread) and write pieces "
                             "of the input (default 1: all in this process, the tokenizer using its own "
                             "threads)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="split the input files into N groups written separately and merged; "
                             "a re-run skips finished groups (resume)")
    parser.add_argument("--chunk-size", type=int, default=64, help="documents per tokenizer batch")
    parser.add_argument("--txt-blocks", action="store_true",
                        help=".txt inputs: one document per blank-line-separated block (default: per file)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--max-doc-bytes", type=int, default=DEFAULT_MAX_DOC_BYTES, metavar="N",
                        help="skip (count as too_large) a record - line, text block or text file - of more "
                             "than N input bytes, dropping its bytes as they are read: tokenizing one "
                             "huge document takes ~100x its size in memory "
                             f"(default {DEFAULT_MAX_DOC_BYTES >> 20} MiB)")
    parser.add_argument("--max-memory", type=int, default=DEFAULT_MAX_MEMORY_MB, metavar="MB",
                        help="memory budget of each worker (and of the parent): records too long to "
                             "tokenize within it are skipped as too_large, as with --max-doc-bytes "
                             f"(default {DEFAULT_MAX_MEMORY_MB} MB; docs/data.md)")
    parser.add_argument("--log-interval", type=int, default=10000,
                        help="documents between log lines when no progress bar is shown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the shards are up to date")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess", help="tokenize corpora into Megatron .bin/.idx shards",
        description="Tokenize corpora into Megatron indexed datasets (.bin/.idx), one shard set per "
                    "tokenizer variant from a single pass. 'vpmoe preprocess merge' concatenates shards; "
                    "'vpmoe preprocess inspect' summarises one. " + EXAMPLE)
    add_preprocess_arguments(parser, required=False)
    parser.set_defaults(func=_run)
    sub = parser.add_subparsers(dest="preprocess_command", metavar="{merge,inspect}")
    sub.required = False
    merge = sub.add_parser("merge", help="concatenate shards (and their loss masks) into one",
                           description="Concatenate indexed datasets of the same dtype into one; "
                                       "their loss-mask datasets are merged alongside.")
    merge.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX")
    merge.add_argument("--output-prefix", dest="merge_output", required=True, metavar="PREFIX")
    merge.set_defaults(func=_merge)
    inspect = sub.add_parser("inspect", help="documents, tokens, dtype and loss roles of a shard",
                             description="Summarise an indexed dataset; with --tokenizer, decode documents.")
    inspect.add_argument("prefix", metavar="PREFIX", help="dataset prefix (without .bin/.idx)")
    inspect.add_argument("--tokenizer", dest="inspect_tokenizer", metavar="DIR", default=None)
    inspect.add_argument("--show", type=int, default=1, help="documents to decode (with --tokenizer)")
    inspect.add_argument("--max-chars", type=int, default=2000,
                         help="characters of each decoded document to print (default 2000)")
    inspect.add_argument("--full", action="store_true", help="print whole decoded documents")
    inspect.set_defaults(func=_inspect)


def _run(args: argparse.Namespace) -> int:
    from megatron_vpmoe.data.preprocess import PreprocessOptions, parse_tokenizer_args, run_preprocess
    from megatron_vpmoe.utils.errors import UsageError

    missing = [flag for flag, value in (("--input", args.input), ("--output-prefix", args.output_prefix),
                                        ("--tokenizer", args.tokenizer)) if not value]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")
    opts = PreprocessOptions(
        inputs=args.input, output_prefix=args.output_prefix, tokenizers=parse_tokenizer_args(args.tokenizer),
        json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers, chunk_size=args.chunk_size,
        partitions=args.partitions, txt_blocks=args.txt_blocks, strict=args.strict,
        log_interval=args.log_interval, progress=not args.no_progress, overwrite=args.overwrite,
        max_doc_bytes=args.max_doc_bytes, max_memory_mb=args.max_memory)
    summary = run_preprocess(opts)
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    if summary.get("up_to_date"):
        print(f"{summary['output_prefix']}: up to date ({summary['documents']} documents; --overwrite rebuilds)")
        return
    print(f"preprocessed {summary['documents']} documents, {summary['bytes'] / 1e6:.2f} MB in "
          f"{summary['seconds']:.1f} s ({summary['docs_per_s']:.0f} docs/s, {summary['mb_per_s']:.2f} MB/s, "
          f"{summary['workers']} workers)")
    for variant, engine in summary.get("engines", {}).items():
        print(f"  {variant}: encoded with {engine}")
    for name, s in summary["shards"].items():
        variant, key = name.split("/", 1)
        mask = " + loss mask" if s["loss_mask"] else ""
        print(f"  {variant:<20} {key:<12} {s['tokens']:>12,} tokens  {s['documents']:>9,} docs{mask}")
    skipped = summary["skipped"]
    if skipped:
        print(f"skipped {sum(skipped.values())} records:")
        for reason, n in sorted(skipped.items()):
            print(f"  {reason}: {n} (first at {', '.join(summary['first_skipped'][reason])})")
    else:
        print("skipped 0 records")


def _merge(args: argparse.Namespace) -> int:
    from megatron_vpmoe.data.preprocess import merge_shards

    for target, s in merge_shards(args.inputs, args.merge_output).items():
        print(f"{target}: {s['documents']} documents, {s['tokens']} tokens")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import numpy

    from megatron_vpmoe.data.shards import exists, mask_prefix_of, read_shard

    # read_shard verifies the .bin size against the .idx (a truncated .bin: one line, exit 2)
    ds = read_shard(args.prefix)
    lengths = ds.sequence_lengths
    print(f"{args.prefix}: {len(ds.document_indices) - 1} documents, {len(lengths)} sequences, "
          f"{int(lengths.sum())} tokens, dtype {ds.index.dtype.__name__}, "
          f"mean length {float(lengths.mean()) if len(lengths) else 0:.1f}")
    mask = mask_prefix_of(args.prefix)
    masks = read_shard(mask) if exists(mask) else None
    if masks is not None:
        counts = numpy.zeros(4, dtype=numpy.int64)
        for i in range(len(masks)):
            counts += numpy.bincount(masks[i], minlength=4)[:4]
        print(f"loss mask {mask}: none {counts[0]}, reasoning {counts[1]}, final {counts[2]}, text {counts[3]}")
    if args.inspect_tokenizer:
        from megatron_vpmoe.tokenizers import load

        tok = load(args.inspect_tokenizer)
        for i in range(min(args.show, len(ds))):
            ids = ds[i].tolist()
            text = tok.decode(ids)
            print(f"--- document {i} ({len(ids)} tokens, {len(text)} characters) ---")
            if args.full or len(text) <= args.max_chars:
                print(text)
            else:
                print(text[: args.max_chars])
                print(f"[... first {args.max_chars} of {len(text)} characters; --full prints the whole document]")
    return 0
