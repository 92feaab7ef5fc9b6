"""``vpmoe eval``: evaluate a checkpoint (bits per byte, GSM8K, multiple choice, long context). (Placeholder until issue 10 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint (bits per byte, GSM8K, multiple choice, long context)", description="evaluate a checkpoint (bits per byte, GSM8K, multiple choice, long context).")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe eval' is not implemented yet (issue 10)")
