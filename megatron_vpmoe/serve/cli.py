"""``vpmoe serve``: serve a checkpoint behind an OpenAI-compatible HTTP API. (Placeholder until issue 6 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible HTTP API", description="serve a checkpoint behind an OpenAI-compatible HTTP API.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe serve' is not implemented yet (issue 6)")
