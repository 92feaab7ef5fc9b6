"""``vpmoe launch slurm|local|mpi``: start ``vpmoe train`` on a SLURM cluster, this host, or mpirun."""

from __future__ import annotations

import argparse
import sys

from megatron_vpmoe.utils.cli_args import add_verbose_arg


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="CONFIG", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    add_verbose_arg(parser)  # exported to the ranks as VPMOE_VERBOSE=1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("launch", help="launch training on SLURM, locally (torchrun) or with mpirun",
                                   description="Launch 'vpmoe train' on a SLURM cluster (sbatch, requeue on "
                                               "preemption), on this host with torchrun, or with mpirun.")
    sub = parser.add_subparsers(dest="launcher", metavar="{slurm,local,mpi}")
    sub.required = True

    slurm = sub.add_parser("slurm", help="render and submit an sbatch script (multi-node, requeue)",
                           description="Render launch/templates/vpmoe.sbatch for the run into "
                                       "{run.dir}/launch/ and submit it. Example: vpmoe launch slurm --nodes 4 "
                                       "--gpus-per-node 8 --partition gpu --time 24:00:00 --config "
                                       "examples/configs/vpmoe-6b.yaml")
    _common(slurm)
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="0 = CPU job (use --ntasks-per-node)")
    slurm.add_argument("--ntasks-per-node", type=int, default=None,
                       help="ranks per node (default: one per GPU; 1 on CPU)")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="default 8 with GPUs, else 1")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", help="time limit, e.g. 24:00:00")
    slurm.add_argument("--job-name")
    slurm.add_argument("--container-image", help="run the ranks in this image (pyxis/enroot srun flag)")
    slurm.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job")
    slurm.add_argument("--signal-seconds", type=int, default=120,
                       help="SLURM sends USR1 this long before the time limit (checkpoint + requeue)")
    slurm.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    slurm.add_argument("--gpu", default="h100-80gb", help="GPU spec for the pre-submit plan (see vpmoe plan)")
    slurm.add_argument("--force", action="store_true", help="submit even if the plan predicts it does not fit")
    slurm.add_argument("--paths-on-cluster", action="store_true",
                       help="the data, tokenizer and checkpoint paths exist only on the cluster: do not check them here")
    slurm.set_defaults(func=_slurm)

    local = sub.add_parser("local", help="torchrun on this host",
                           description="Run N ranks on this host with torchrun. Example: vpmoe launch local "
                                       "--nproc 2 --config examples/configs/tiny-cpu.yaml")
    _common(local)
    local.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this host")
    local.set_defaults(func=_local)

    mpi = sub.add_parser("mpi", help="OpenMPI mpirun (ranks from OMPI_COMM_WORLD_*)",
                         description="Run N ranks with mpirun. Example: vpmoe launch mpi --np 2 --config "
                                     "examples/configs/tiny-cpu.yaml")
    _common(mpi)
    mpi.add_argument("--np", type=int, default=1, help="ranks")
    mpi.add_argument("--hostfile", help="OpenMPI hostfile (the first host is the rendezvous)")
    mpi.set_defaults(func=_mpi)


def _slurm(args: argparse.Namespace) -> int:
    from megatron_vpmoe.launch.plan_gate import plan_gate
    from megatron_vpmoe.launch.slurm import SlurmJob, render_sbatch, write_and_submit

    job = SlurmJob(config=args.config, overrides=args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   ntasks_per_node=args.ntasks_per_node, cpus_per_task=args.cpus_per_task,
                   partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                   job_name=args.job_name, container_image=args.container_image,
                   env=args.env + (["VPMOE_VERBOSE=1"] if args.verbose else []),
                   signal_seconds=args.signal_seconds, gpu=args.gpu, paths_on_cluster=args.paths_on_cluster)
    rendered = render_sbatch(job)  # refuses what the trainer would refuse at start: one line, exit 2
    summary = plan_gate(args.config, args.overrides, args.nodes, args.gpus_per_node, args.gpu, args.force,
                        write=not args.dry_run)
    planned = summary and not summary[0].startswith("vpmoe plan: not planned")
    out = sys.stderr if args.dry_run else sys.stdout
    if planned:
        print("\n".join(summary), file=out, flush=True)
    write_and_submit(job, dry_run=args.dry_run, rendered=rendered)
    if summary and not planned:
        print(summary[0], file=out, flush=True)
    return 0


def _local(args: argparse.Namespace) -> int:
    from megatron_vpmoe.launch.local import run_launcher, torchrun_command

    return run_launcher(lambda: torchrun_command(args.nproc, args.config, args.overrides), args.config,
                        args.overrides, args.nproc, usr1_as_term=True)


def _mpi(args: argparse.Namespace) -> int:
    from megatron_vpmoe.launch.local import mpirun_command, run_launcher

    return run_launcher(lambda: mpirun_command(args.np, args.config, args.overrides, args.hostfile), args.config,
                        args.overrides, args.np)
