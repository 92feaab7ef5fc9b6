"""``vpmoe convert``: convert checkpoints to and from Hugging Face format. (Placeholder until issue 9 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints to and from Hugging Face format", description="convert checkpoints to and from Hugging Face format.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe convert' is not implemented yet (issue 9)")
