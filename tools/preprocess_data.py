#!/usr/bin/env python
"""Megatron-LM's ``tools/preprocess_data.py``, as a drop-in, over ``vpmoe preprocess``.

Megatron-LM's flags and output: ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``
(a local directory), ``GPT2BPETokenizer --vocab-file --merge-file``, ``SentencePieceTokenizer``/
``GPTSentencePieceTokenizer``/``Llama2Tokenizer --tokenizer-model FILE.model`` or ``TikTokenizer
--tokenizer-model FILE.json|FILE.tiktoken`` with ``--tiktoken-pattern``, ``--vocab-size``,
``--tiktoken-num-special-tokens``, ``--tokenizer-special-tokens``
(:mod:`megatron_vpmoe.tokenizers.megatron_flags`), ``--input``, ``--json-keys``,
``--output-prefix``, ``--append-eod`` (off unless given), ``--workers``, ``--partitions``,
``--log-interval``, ``--keep-sequential-samples`` (documents are always kept in input order);
the output is ``{prefix}_{key}_document.bin/.idx`` and nothing else in the output folder (the
summary is printed; its copy, which makes a re-run "up to date", goes to the user cache).
Documents are kept as Megatron-LM keeps them: an empty or whitespace-only text is a document
(an empty one has no tokens and no EOD). ``--split-sentences`` cuts each text into sentences with NLTK's punkt model for ``--lang`` from
local data (``punkt_tab``, NLTK >= 3.9; nothing is downloaded, a missing model is one line), each
non-empty sentence a sequence of its document, EOD in the last, written as
``{prefix}_{key}_sentence`` in one run (Megatron-LM writes an ``_ss`` copy of the input first);
``--keep-newlines`` is refused. ``Encoder``/``get_args``/``main`` have Megatron-LM's shapes so
its own tests can import them. ``--tokenizer DIR`` (several: one shard set each, vpmoe names) stays.
"""

import argparse
import hashlib
import json
import os
import sys

from megatron_vpmoe.data.cli import add_preprocess_arguments, print_summary
from megatron_vpmoe.data.preprocess import PreprocessOptions, parse_tokenizer_args, run_preprocess
from megatron_vpmoe.utils.errors import InputError, VpmoeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_preprocess_arguments(parser, required=True, append_eod=False)  # off, as in Megatron-LM
    group = parser.add_argument_group("Megatron-LM's flags")
    group.add_argument("--tokenizer-type", default=None, metavar="TYPE",
                       help="HuggingFaceTokenizer (with --tokenizer-model DIR), GPT2BPETokenizer (with "
                            "--vocab-file and --merge-file), SentencePieceTokenizer, GPTSentencePieceTokenizer, "
                            "Llama2Tokenizer (with --tokenizer-model FILE.model) or TikTokenizer (with "
                            "--tokenizer-model FILE.json or FILE.tiktoken)")
    group.add_argument("--tokenizer-model", default=None, metavar="PATH",
                       help="a local tokenizer directory, SentencePiece .model or TikTokenizer vocabulary")
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"],
                       help="TikTokenizer's split pattern (default v2)")
    group.add_argument("--vocab-size", type=int, default=None, help="TikTokenizer's vocabulary size (default 131072)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer's special-token ids 0..N-1 (default 1000)")
    group.add_argument("--tokenizer-special-tokens", "--tiktoken-special-tokens", dest="special_tokens",
                       nargs="+", default=None, help="TikTokenizer's special tokens (default <unk> <s> </s> "
                                                      "<mask> <pad> <cls> <sep>)")
    group.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                       help="refused: the legacy SentencePiece wrapper is not supported")
    group.add_argument("--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
                       "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces",
                       dest="tokenizer_sentencepiece_ignore_extra_whitespaces", action="store_false",
                       help="refused: extra whitespace is handled as the SentencePiece model does")
    group.add_argument("--use-gigatoken", action="store_true",
                       help="accepted: the gigatoken engine is used whenever it reproduces the tokenizer's ids")
    group.add_argument("--split-sentences", action="store_true", help="split documents into sentences (NLTK punkt)")
    group.add_argument("--keep-newlines", action="store_true", help="with --split-sentences")
    group.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted: documents always keep their input order")
    group.add_argument("--find-optimal-num-workers", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--workers-to-check", nargs="+", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--max-documents", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def get_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.keep_empty = True  # Megatron-LM's rule for this script
    return args


def _summary_path(prefix: str) -> str:
    """Beside nothing in the output folder: the cache, named by the absolute output prefix."""
    from megatron_vpmoe.tokenizers.megatron_flags import cache_root

    digest = hashlib.sha256(os.path.abspath(prefix).encode()).hexdigest()[:20]
    return str(cache_root() / "preprocess" / f"{digest}.summary.json")


def _tokenizers(args) -> dict:
    from megatron_vpmoe.tokenizers.megatron_flags import tokenizer_dir_from_flags

    if args.tokenizer:
        if args.tokenizer_type or args.tokenizer_model:
            raise InputError("give --tokenizer DIR... or Megatron-LM's --tokenizer-type/--tokenizer-model, not both")
        return parse_tokenizer_args(args.tokenizer)
    path = tokenizer_dir_from_flags(args)
    return {"tokenizer": path}


def _check_unsupported(args) -> None:
    if args.find_optimal_num_workers:
        raise InputError("--find-optimal-num-workers: not supported here (the work is cut into pieces per "
                         "worker already); give --workers N")
    if args.keep_newlines:
        raise InputError("--keep-newlines: not supported by this tool (with --split-sentences, newlines after a "
                         "sentence go as punkt's default splitter puts them)")
    if args.split_sentences:
        from megatron_vpmoe.data.encode import sentence_splitter

        sentence_splitter(args.lang)  # the punkt model is here, or one line saying what is missing


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        _check_unsupported(args)
        tokenizers = _tokenizers(args)
        megatron = not args.tokenizer  # Megatron-LM's flags: Megatron-LM's names and files
        if megatron and args.split_sentences:
            megatron = "sentence"  # {prefix}_{key}_sentence, as Megatron-LM names split output
        opts = PreprocessOptions(
            inputs=args.input, output_prefix=args.output_prefix, tokenizers=tokenizers,
            json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
            chunk_size=args.chunk_size, partitions=args.partitions, txt_blocks=args.txt_blocks,
            strict=args.strict, log_interval=args.log_interval, progress=not args.no_progress,
            overwrite=args.overwrite, max_doc_bytes=args.max_doc_bytes, max_memory_mb=args.max_memory,
            keep_empty=args.keep_empty, split_sentences=args.lang if args.split_sentences else None,
            megatron_names=megatron, summary_path=_summary_path(args.output_prefix) if megatron else None)
        print_summary(run_preprocess(opts))
    except VpmoeError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


class Encoder:
    """Megatron-LM's ``Encoder`` shape: ``initializer()`` loads the tokenizer; ``encode(json_line)``
    gives ``({key: ids}, {key: sequence lengths}, len(json_line))`` exactly as :func:`main` writes them."""

    tokenizer = None
    _encoder = None

    def __init__(self, args):
        self.args = args

    def initializer(self) -> None:
        from megatron_vpmoe.data.encode import DocumentEncoder

        _check_unsupported(self.args)
        tokenizers = _tokenizers(self.args)
        Encoder._encoder = DocumentEncoder(tokenizers, self.args.json_keys, self.args.append_eod,
                                           keep_empty=self.args.keep_empty,
                                           split_sentences=self.args.lang if self.args.split_sentences else None)
        Encoder.tokenizer = _MegatronStyleTokenizer(next(iter(Encoder._encoder.tokenizers.values())))

    def encode(self, json_line: str):
        from megatron_vpmoe.data.sources import Document, Skipped

        fields = json.loads(json_line)
        doc = self._encoder.encode_batch([Document("line", {k: fields[k] for k in self.args.json_keys},
                                                   len(json_line))])[0]
        if isinstance(doc, Skipped):
            raise InputError(f"{json_line[:60]!r}: {doc.reason}")
        ids = {key: ids for (_, key), ids in doc.ids.items()}
        sentences = {key: lengths for (_, key), lengths in doc.sentences.items()}
        return ids, {key: sentences.get(key, [len(v)] if v else []) for key, v in ids.items()}, len(json_line)


class _MegatronStyleTokenizer:
    """``tokenize``/``detokenize``/``decode``/``eod``/``vocab_size``, as Megatron-LM's tokenizers name them."""

    def __init__(self, tok):
        self._tok = tok
        self.eod = tok.eod_id
        self.vocab_size = tok.vocab_size

    def tokenize(self, text: str):
        return self._tok.encode(text)

    def detokenize(self, ids):
        return self._tok.decode(list(ids))

    decode = detokenize


if __name__ == "__main__":
    sys.exit(main())
