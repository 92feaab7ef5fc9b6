"""``vpmoe experiment tokenizers``: run the tokenizer experiment here, or as SLURM jobs (``--launch slurm``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    exp = subparsers.add_parser("experiment", help="end-to-end experiments (tokenizer comparison)",
                                description="End-to-end experiments.")
    exp_sub = exp.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    exp_sub.required = True
    tok = exp_sub.add_parser(
        "tokenizers", help="train, evaluate and compare tokenizer variants over seeds",
        description="Per tokenizer variant and seed: get the tokenizer, preprocess the same documents once, "
                    "train on the same bytes, evaluate; one report with mean ± std over seeds at equal bytes "
                    "and equal FLOPs. Resumable. With --launch slurm the training runs become one sbatch job "
                    "per variant x seed; run the command again without --launch when they are done to "
                    "evaluate them and write the report.")
    tok.add_argument("--config", "-c", required=True, metavar="YAML", help="experiment config "
                     "(examples/experiments/tokenizers-cpu.yaml); its paths are relative to it")
    tok.add_argument("--out", default=None, metavar="DIR", help="output dir (default: the config's out)")
    tok.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override an experiment key, e.g. --set train_bytes=200000 --set seeds=[1,2]")
    tok.add_argument("--launch", choices=["slurm"], default=None,
                     help="write (and submit) one sbatch job per variant x seed instead of training here")
    tok.add_argument("--dry-run", action="store_true", help="with --launch: write the scripts, do not submit")
    tok.add_argument("--nodes", type=int, default=1, help="with --launch: nodes per job")
    tok.add_argument("--gpus-per-node", type=int, default=8, help="with --launch: GPUs per node")
    tok.add_argument("--partition", help="with --launch: SLURM partition")
    tok.add_argument("--account", help="with --launch: SLURM account")
    tok.add_argument("--time", help="with --launch: time limit per job, e.g. 24:00:00")
    tok.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.launch == "slurm":
        from megatron_vpmoe.experiments.tokenizers import write_slurm_jobs

        write_slurm_jobs(args.config, out=args.out, overrides=args.overrides, dry_run=args.dry_run,
                         job_options={"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                                      "partition": args.partition, "account": args.account, "time": args.time})
        return 0
    if args.dry_run:
        from megatron_vpmoe.utils.errors import UsageError

        raise UsageError("--dry-run applies to --launch slurm")
    from megatron_vpmoe.experiments.tokenizers import run_tokenizer_experiment

    run_tokenizer_experiment(args.config, out=args.out, overrides=args.overrides)
    return 0
