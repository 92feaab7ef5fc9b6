"""``vpmoe tokenizer``: train student tokenizers, fetch the teacher's, evaluate side by side."""

from __future__ import annotations

import argparse

TRAIN_KINDS = ("bpe", "unigram", "lengthmax", "pruned")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train, evaluate and fetch tokenizer variants",
                                   description="Train, evaluate and fetch tokenizer variants.")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True

    train = sub.add_parser("train", help="train a student tokenizer into a directory",
                           description="Train a bpe / unigram / lengthmax / pruned tokenizer. "
                                       "Example: vpmoe tokenizer train --kind lengthmax --vocab-size 32000 "
                                       "--input '../shared/data/corpora/gutenberg_en/*.txt' --output toks/lm32k")
    train.add_argument("--kind", required=True, choices=TRAIN_KINDS)
    train.add_argument("--vocab-size", type=int, required=True, help="ids including special tokens")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                       help="text files, directories (their text files, recursively), globs, or FILE.jsonl:FIELD (dotted field path)")
    train.add_argument("--output", required=True, metavar="DIR")
    train.add_argument("--max-bytes", type=int, default=None, help="train on the first N bytes only")
    train.add_argument("--superword", action="store_true", help="bpe: no pre-tokenization regex (tokens cross spaces)")
    train.add_argument("--max-token-chars", type=int, default=None, help="lengthmax: cap on UTF-8 bytes per token")
    train.add_argument("--max-token-words", type=int, default=None, help="lengthmax: cap on words per token")
    train.add_argument("--lengthmax-encoder", choices=("merges", "min-tokens"), default=None,
                       help="lengthmax: 'merges' (default) replays the learned merges as a BPE model, at BPE "
                            "speed; 'min-tokens' is the minimum-token Unigram segmentation (a little fewer "
                            "tokens, slower encoding)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    train.set_defaults(func=_train)

    get = sub.add_parser("get", help="write the teacher's tokenizer (o200k Harmony) to a directory",
                         description="Example: vpmoe tokenizer get harmony --output toks/harmony")
    get.add_argument("which", choices=("harmony",))
    get.add_argument("--output", required=True, metavar="DIR")
    get.add_argument("--ranks", default=None, help="o200k_base.tiktoken (default: $TIKTOKEN_ENCODINGS_BASE "
                                                   "or ../shared/tokenizers, else tiktoken's cache or download)")
    get.add_argument("--overwrite", action="store_true")
    get.set_defaults(func=_get)

    ev = sub.add_parser("eval", help="compare tokenizers on text (report.json, report.md, plots)",
                        description="Example: vpmoe tokenizer eval --tokenizers toks/* --input held_out.txt --report out/")
    ev.add_argument("--tokenizers", nargs="+", required=True, metavar="DIR")
    ev.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB")
    ev.add_argument("--report", required=True, metavar="OUT_DIR")
    ev.add_argument("--hidden-size", type=int, default=1024, help="for embedding+head params (untied)")
    ev.add_argument("--seq-length", type=int, default=4096, help="context length for the histogram")
    ev.add_argument("--max-bytes", type=int, default=None, help="evaluate on the first N bytes only")
    ev.set_defaults(func=_eval)


def _check_output(output: str, overwrite: bool) -> None:
    from pathlib import Path

    from megatron_vpmoe.utils.errors import InputError

    if Path(output).exists() and not overwrite:
        raise InputError(f"{output}: already exists (pass --overwrite to replace it)")


def _train(args: argparse.Namespace) -> int:
    from megatron_vpmoe.tokenizers.train import train_tokenizer
    from megatron_vpmoe.utils.errors import InputError

    _check_output(args.output, args.overwrite)
    options = {}
    if args.superword:
        if args.kind != "bpe":
            raise InputError("--superword applies to --kind bpe only")
        options["superword"] = True
    for flag, option in (("max_token_chars", "max_token_chars"), ("max_token_words", "max_token_words"),
                         ("lengthmax_encoder", "encoder")):
        if getattr(args, flag) is not None:
            if args.kind != "lengthmax":
                raise InputError(f"--{flag.replace('_', '-')} applies to --kind lengthmax only")
            options[option] = getattr(args, flag)
    tok = train_tokenizer(args.kind, args.input, args.vocab_size, output=args.output,
                          max_bytes=args.max_bytes, show_progress=True, **options)
    print(f"trained {tok.kind} tokenizer: vocab_size {tok.vocab_size} (padded {tok.padded_vocab_size()}) "
          f"from {tok.metadata['train_files']} file(s), {tok.metadata['train_bytes']:,} bytes "
          f"in {tok.metadata.get('train_seconds', 0):.1f}s -> {args.output}")
    return 0


def _get(args: argparse.Namespace) -> int:
    from megatron_vpmoe.tokenizers.tiktoken_variant import harmony_tokenizer

    _check_output(args.output, args.overwrite)
    tok = harmony_tokenizer(args.ranks)
    tok.save(args.output)
    print(f"wrote o200k Harmony tokenizer: vocab_size {tok.vocab_size} -> {args.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from megatron_vpmoe.tokenizers.evaluate import evaluate_tokenizers

    rows = evaluate_tokenizers(args.tokenizers, args.input, args.report, hidden_size=args.hidden_size,
                               seq_length=args.seq_length, max_bytes=args.max_bytes)
    for row in rows:
        print(f"{row['name']:>20} {row['kind']:>9} vocab {row['vocab_size']:>7} "
              f"tokens/char {row['tokens_per_char']:.4f} roundtrip {row['roundtrip_exact']} "
              f"{row['encode_mb_per_s']:.2f} MB/s")
    print(f"report -> {args.report}/report.md")
    return 0
