"""``vpmoe launch slurm``: render the sbatch script for a training run and submit it.

The script (``launch/templates/vpmoe.sbatch``, installed as package data through the
``megatron_vpmoe/launch/templates`` link and read with ``importlib.resources``) runs one srun task per rank, sets the
rendezvous to the first node of the allocation, forwards SLURM's early USR1 to the ranks (they
checkpoint and exit 75) and requeues the job, which then resumes from the latest checkpoint.
It is written to ``{run.dir}/launch/<job name>.sbatch`` (atomically) so the operator can read
and re-submit it; ``--dry-run`` prints it without submitting.

Before anything is rendered, the job is refused (one line, exit 2) for whatever the trainer would
refuse at start on the rendered layout (:func:`megatron_vpmoe.config.startup.check_world_layout`:
a layout error names the layout ``vpmoe plan`` suggests) and for inputs that do not exist here
(:func:`~megatron_vpmoe.config.startup.check_paths`, a tokenizer larger than ``model.vocab_size``),
unless ``paths_on_cluster`` says they exist only on the cluster.
"""

from __future__ import annotations

import datetime
import importlib.resources
import re
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import EXIT_REQUEUE, ConfigError, InputError, UsageError, VpmoeError

TEMPLATE = importlib.resources.files("megatron_vpmoe.launch") / "templates" / "vpmoe.sbatch"


@dataclass
class SlurmJob:
    config: str
    overrides: List[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8
    ntasks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 on CPU
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    job_name: Optional[str] = None
    container_image: Optional[str] = None
    env: List[str] = field(default_factory=list)  # KEY=VALUE
    signal_seconds: int = 120
    python: str = sys.executable
    workdir: str = "."
    template: object = TEMPLATE  # a Path, or the packaged Traversable
    gpu: str = "h100-80gb"  # the GPU spec a refused layout's suggestion is planned for
    paths_on_cluster: bool = False  # data/tokenizer/checkpoint paths exist only on the cluster: not checked here


def _q(value) -> str:
    return shlex.quote(str(value))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _plain(value, what: str) -> str:
    """``value`` as text; a newline or other control character (which would end a ``#SBATCH``
    line or the script's command line) is a usage error naming ``what``."""
    text = str(value)
    bad = _CONTROL.search(text)
    if bad:
        raise UsageError(f"{what}: control character {bad.group()!r} in {text!r} (newlines and control "
                         f"characters are not allowed in a batch script)")
    return text


def job_name(job: SlurmJob, cfg) -> str:
    """The job's name (``--job-name``, else ``run.name``, else the config's file stem): it names
    the script file too, so a path separator is refused."""
    name, what = ((job.job_name, "--job-name") if job.job_name else
                  (cfg.run.name, "run.name") if cfg.run.name else (Path(job.config).stem, "--config"))
    name = _plain(name, what)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError(f"{what}: job name {name!r} must not contain a path separator")
    return name


def check_job(job: SlurmJob, cfg, tasks_per_node: int) -> None:
    """Refuse what the trainer refuses at start on ``job.nodes x tasks_per_node`` ranks (naming the
    layout ``vpmoe plan`` suggests for a layout error), then inputs missing here (unless
    ``job.paths_on_cluster``) and a tokenizer with more tokens than ``model.vocab_size``."""
    from megatron_vpmoe.config.startup import check_paths, check_world_layout

    try:
        check_world_layout(cfg, job.nodes * tasks_per_node)
    except ConfigError as err:
        from megatron_vpmoe.launch.plan_gate import suggested_layout

        suggestion = suggested_layout(cfg, job.nodes, tasks_per_node, job.gpu if job.gpus_per_node else "cpu")
        hint = (f"; `vpmoe plan` suggests {suggestion}" if suggestion else
                f"; `vpmoe plan` finds no layout of {job.nodes} x {tasks_per_node} ranks that fits")
        raise ConfigError(f"on {job.nodes} x {tasks_per_node} ranks: {err.message}{hint}", key=err.key,
                          file=err.file or job.config) from None
    if job.paths_on_cluster:
        return
    workdir = Path(job.workdir).resolve()
    try:
        check_paths(cfg, workdir)
    except ConfigError as err:
        raise ConfigError(f"{err.message} here (a path that exists only on the cluster: --paths-on-cluster)",
                          key=err.key, file=err.file or job.config) from None
    if cfg.data.tokenizer:
        from megatron_vpmoe.tokenizers import load

        tok_dir = Path(cfg.data.tokenizer)
        size = load(tok_dir if tok_dir.is_absolute() else workdir / tok_dir).vocab_size
        if size > cfg.model.vocab_size:  # the trainer's check: its ids would index past the embedding
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {size} tokens, more than "
                              f"model.vocab_size {cfg.model.vocab_size}", key="model.vocab_size", file=job.config)


def render_sbatch(job: SlurmJob) -> tuple[str, str, str]:
    """(script text, run dir, job name). Validates the config (and overrides) first.

    Every value from a flag or the config is checked for control characters (naming the flag or
    key) and shell-quoted, in ``#SBATCH`` lines too (sbatch reads quotes there like a shell), so
    nothing in a value can end a line or run as a command."""
    from megatron_vpmoe.config import load_config

    for override in job.overrides:
        _plain(override, "--set")
    _plain(job.config, "--config")
    cfg = load_config(job.config, job.overrides)
    if job.nodes < 1 or job.gpus_per_node < 0:
        raise UsageError("--nodes must be >= 1 and --gpus-per-node >= 0")
    if job.signal_seconds < 0:
        raise UsageError("--signal-seconds must be >= 0")
    tasks = job.ntasks_per_node or (job.gpus_per_node if job.gpus_per_node > 0 else 1)
    if job.gpus_per_node and tasks != job.gpus_per_node:
        raise UsageError(f"--ntasks-per-node {tasks} must equal --gpus-per-node {job.gpus_per_node} "
                         f"(one rank per GPU)")
    world = job.nodes * tasks
    cpus = job.cpus_per_task or (8 if job.gpus_per_node else 1)
    directives = []
    if job.gpus_per_node:
        directives.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos),
                        ("time", job.time)):
        if value:
            directives.append(f"#SBATCH --{flag}={_q(_plain(value, '--' + flag))}")
    exports = []
    for item in job.env:
        key, sep, value = _plain(item, "--env").partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        exports.append(f"export {key}={_q(value)}")
    run_dir = Path(_plain(cfg.run.dir, "run.dir")).resolve()
    name = job_name(job, cfg)
    config_path = Path(job.config).resolve()
    python = _plain(job.python, "python")
    workdir = Path(_plain(job.workdir, "workdir")).resolve()
    train = [python, "-m", "megatron_vpmoe.cli", "train", "--config", str(config_path)]
    for override in job.overrides:
        train += ["--set", override]
    image = _plain(job.container_image, "--container-image") if job.container_image else None
    srun_extra = f"--container-image={_q(image)} " if image else ""
    check_job(job, cfg, tasks)  # what the trainer would refuse is an error now, not after the queue
    source = job.template if hasattr(job.template, "read_text") else Path(job.template)
    template = string.Template(source.read_text())
    values = dict(
        header=f"generated by `vpmoe launch slurm` on {datetime.datetime.now():%Y-%m-%d %H:%M}: "
               f"{job.nodes} node(s) x {tasks} rank(s) = {world} ranks, config {config_path}",
        job_name=_q(name), nodes=job.nodes, ntasks_per_node=tasks, cpus_per_task=cpus,
        optional_directives="".join(d + "\n" for d in directives),
        log_file=_q(f"{run_dir / 'logs'}/%x-%j.out"), signal_seconds=job.signal_seconds,
        workdir=_q(workdir), env_exports="\n".join(exports), omp_threads=cpus,
        requeue_marker=_q(run_dir / "REQUEUE"), requeue_exit_code=EXIT_REQUEUE, srun_extra=srun_extra,
        plan_file=_q(run_dir / "launch" / "plan.txt"),
        train_command=" ".join(_q(a) for a in train))
    try:
        return template.substitute(values), str(run_dir), name
    except (KeyError, ValueError) as err:
        raise InputError(f"{job.template}: bad template placeholder ({err})") from None


def write_and_submit(job: SlurmJob, dry_run: bool = False, rendered: Optional[tuple] = None) -> Optional[str]:
    """Write the script under the run dir; submit it unless ``dry_run``; returns the job id.
    ``rendered``: :func:`render_sbatch`'s result for ``job``, when the caller already has it."""
    script, run_dir, name = rendered or render_sbatch(job)
    if dry_run:
        print(script, end="")
        return None
    path = Path(run_dir) / "launch" / f"{name}.sbatch"
    (Path(run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, script)
    if shutil.which("sbatch") is None:
        raise VpmoeError(f"sbatch not found; the script is at {path} (submit it on a SLURM login node)")
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise VpmoeError(f"sbatch {path} failed: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {path}\n  logs: {Path(run_dir) / 'logs'}/{name}-{job_id}.out")
    return job_id
