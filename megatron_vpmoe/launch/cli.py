"""``vpmoe launch``: launch training on SLURM, locally (torchrun) or with mpirun. (Placeholder until issue 8 lands.)"""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.errors import VpmoeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("launch", help="launch training on SLURM, locally (torchrun) or with mpirun", description="launch training on SLURM, locally (torchrun) or with mpirun.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise VpmoeError("'vpmoe launch' is not implemented yet (issue 8)")
