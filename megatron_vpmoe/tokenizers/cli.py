"""``vpmoe tokenizer``: train, evaluate and fetch tokenizer variants. (Placeholder until issue 11 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train, evaluate and fetch tokenizer variants", description="train, evaluate and fetch tokenizer variants.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe tokenizer' is not implemented yet (issue 11)")
