"""``vpmoe distill``: teacher-generated corpora and on-policy distillation. (Placeholder until issue 6 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("distill", help="teacher-generated corpora and on-policy distillation", description="teacher-generated corpora and on-policy distillation.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe distill' is not implemented yet (issue 6)")
