"""``vpmoe config``: show or validate a run config and its parameter counts; print the key reference."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="show or validate a run config",
                                   description="Load a run config, validate it, print it resolved.")
    sub = parser.add_subparsers(dest="config_command", metavar="{show,validate,reference}")
    sub.required = True
    show = sub.add_parser("show", help="print the resolved config and the parameter counts")
    _config_argument(show)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable)")
    show.set_defaults(func=_show)
    validate = sub.add_parser("validate", help="validate a config; exit 2 naming the bad key")
    _config_argument(validate)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=_validate)
    reference = sub.add_parser("reference", help="print every config key (type, default, meaning) as Markdown")
    reference.set_defaults(func=_reference)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    """The run config, as ``CONFIG`` or ``--config CONFIG`` (as train, launch and plan take it)."""
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="run config YAML (or --config CONFIG)")
    parser.add_argument("--config", dest="config_flag", metavar="CONFIG", help="run config YAML")


def _config_path(args: argparse.Namespace) -> str:
    from megatron_vpmoe.utils.errors import InputError

    if args.config and args.config_flag and args.config != args.config_flag:
        raise InputError(f"two configs given: {args.config} and --config {args.config_flag}")
    path = args.config or args.config_flag
    if not path:
        raise InputError("no config given: pass CONFIG or --config CONFIG")
    return path


def _show(args: argparse.Namespace) -> int:
    from megatron_vpmoe.config import dump_config, load_config
    from megatron_vpmoe.model.params import count_parameters

    cfg = load_config(_config_path(args), args.overrides)
    print(dump_config(cfg), end="")
    print("---")
    for line in count_parameters(cfg.model).lines():
        print(line)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from megatron_vpmoe.config import load_config

    path = _config_path(args)
    load_config(path, args.overrides)
    print(f"{path}: ok")
    return 0


def _reference(args: argparse.Namespace) -> int:
    from megatron_vpmoe.config.reference import reference_markdown

    print(reference_markdown(), end="")
    return 0
