"""``vpmoe preprocess``: tokenize corpora into Megatron .bin/.idx shards. (Placeholder until issue 3 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("preprocess", help="tokenize corpora into Megatron .bin/.idx shards", description="tokenize corpora into Megatron .bin/.idx shards.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe preprocess' is not implemented yet (issue 3)")
