#!/usr/bin/env python
"""Megatron-LM's ``tools/preprocess_data.py`` interface over ``vpmoe preprocess``.

The familiar flags work (``--input``, ``--json-keys``, ``--output-prefix``, ``--append-eod``,
``--workers``, ``--partitions``, ``--log-interval``); the tokenizer is a vpmoe tokenizer
directory (``--tokenizer-model DIR``, or several with ``--tokenizer``). Megatron-LM's
``--tokenizer-type``/``--vocab-file``/``--merge-file`` are not used: build the tokenizer
directory with ``vpmoe tokenizer train|get`` first. Output names are Megatron's
(``{prefix}.{variant}_{key}_document``). As in Megatron-LM, ``--append-eod`` is off unless
given (``vpmoe preprocess`` turns it on by default).
"""

import argparse
import sys

from megatron_vpmoe.data.cli import add_preprocess_arguments, print_summary
from megatron_vpmoe.data.preprocess import PreprocessOptions, parse_tokenizer_args, run_preprocess
from megatron_vpmoe.utils.errors import VpmoeError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_preprocess_arguments(parser, required=True, append_eod=False)  # off, as in Megatron-LM
    parser.add_argument("--tokenizer-model", action="append", default=[], metavar="DIR",
                        help="tokenizer directory (Megatron-LM's flag name; same as --tokenizer)")
    args = parser.parse_args(argv)
    tokenizers = args.tokenizer + args.tokenizer_model
    if not tokenizers:
        parser.error("give --tokenizer-model DIR (or --tokenizer DIR ...)")
    try:
        opts = PreprocessOptions(
            inputs=args.input, output_prefix=args.output_prefix, tokenizers=parse_tokenizer_args(tokenizers),
            json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
            chunk_size=args.chunk_size, partitions=args.partitions, txt_blocks=args.txt_blocks,
            strict=args.strict, log_interval=args.log_interval, progress=not args.no_progress,
            overwrite=args.overwrite, max_doc_bytes=args.max_doc_bytes)
        print_summary(run_preprocess(opts))
    except VpmoeError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
