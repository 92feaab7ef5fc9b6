"""``vpmoe train``: pretrain VPMoE from a run config (launch with torchrun, srun or mpirun)."""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.cli_args import add_config_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="pretrain VPMoE from a run config",
        description="Pretrain VPMoE from a run config. Resumes from the latest checkpoint under "
                    "checkpoint.dir when there is one (checkpoint.load: auto). Exits 75 after "
                    "saving a checkpoint on SIGTERM/SIGUSR1 or a first Ctrl-C (requeue; a second Ctrl-C aborts). Multi-process: "
                    "torchrun --nproc-per-node N -m megatron_vpmoe.cli train ..., srun or mpirun.",
        epilog="example: vpmoe train --config examples/configs/tiny-cpu.yaml --set train.steps=50")
    add_config_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, quiet=args.quiet)
    try:
        return trainer.run()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
