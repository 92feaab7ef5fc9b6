"""Flags shared by every subcommand that takes a run config (``--config``, ``--set``, ``--verbose``)."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--config", "-c", required=required, metavar="YAML",
                        help="run config (see examples/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    add_verbose_arg(parser)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="every rank's output and the third-party notices utils/notices.py silences")

