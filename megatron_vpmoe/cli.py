"""The ``vpmoe`` command line: one entry point, one subcommand per stage of the pipeline.

Each subcommand's parser and handler live with the code they drive (``<area>/cli.py``
exposes ``register(subparsers)``); this module only wires them together, so ``vpmoe --help``
stays fast (area modules import torch lazily, inside their handlers).

Exit codes: 0 ok, 1 failure, 2 usage / config / input error (one line on stderr; an OS error
about a path, such as an unwritable output directory, counts as one), 75 checkpoint saved on
preemption (requeue).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Sequence

from megatron_vpmoe import __version__
from megatron_vpmoe.utils.errors import EXIT_FAILURE, EXIT_USAGE, VpmoeError

# (subcommand module, in the order `vpmoe --help` lists them)
SUBCOMMAND_MODULES = [
    "megatron_vpmoe.config.cli",  # config
    "megatron_vpmoe.tokenizers.cli",  # tokenizer
    "megatron_vpmoe.data.cli",  # preprocess
    "megatron_vpmoe.training.cli",  # train
    "megatron_vpmoe.distill.cli",  # distill
    "megatron_vpmoe.plan.cli",  # plan
    "megatron_vpmoe.launch.cli",  # launch
    "megatron_vpmoe.convert.cli",  # convert
    "megatron_vpmoe.eval.cli",  # eval
    "megatron_vpmoe.experiments.cli",  # experiment
    "megatron_vpmoe.serve.cli",  # serve
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vpmoe",
        description="Megatron-style pretraining and distillation stack for VPMoE.",
    )
    parser.add_argument("--version", action="version", version=f"megatron_vpmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _install_notices(args)
    try:
        return int(args.func(args) or 0)
    except VpmoeError as err:
        print(f"vpmoe {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("vpmoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `vpmoe config show X | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        if err.filename is None:  # not about a path the user named: a bug, keep the traceback
            raise
        print(f"vpmoe {args.command}: error: {_describe_os_error(err)}", file=sys.stderr)
        return EXIT_USAGE if err.errno in _PATH_ERRNOS else EXIT_FAILURE


def _install_notices(args: argparse.Namespace) -> None:
    """Known third-party notices and other ranks' output silenced (``utils/notices.py``), unless --verbose."""
    from megatron_vpmoe.training.distributed import discover_ranks
    from megatron_vpmoe.utils.notices import install

    try:
        rank = discover_ranks().rank
    except VpmoeError:  # a malformed launcher variable: the trainer reports it
        rank = 0
    install(verbose_flag=bool(getattr(args, "verbose", False)), rank=rank)


# a path that cannot be read or written as given: fix the path or its permissions and re-run
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}


def _describe_os_error(err: OSError) -> str:
    """``path: reason`` on one line (an output directory under a file, a read-only or full disk)."""
    path = err.filename
    if isinstance(err, FileExistsError) and not os.path.isdir(path):
        return f"{path}: exists and is not a directory (cannot create an output under it)"
    reason = err.strerror or str(err)
    return f"{path}: {reason}" + (f" ({err.filename2})" if err.filename2 else "")


if __name__ == "__main__":
    sys.exit(main())
