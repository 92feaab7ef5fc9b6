"""``vpmoe train``: pretrain VPMoE from a run config. (Placeholder until issue 4 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="pretrain VPMoE from a run config", description="pretrain VPMoE from a run config.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe train' is not implemented yet (issue 4)")
