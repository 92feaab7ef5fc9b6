"""The rendered sbatch script is inert to hostile values and requeues on exactly the trainer's
requeue exit code: every flag and config value that reaches the script is fed shell
metacharacters, the script is run with stub ``srun``/``scontrol``/``sbatch`` on PATH, and nothing
the values spell out may execute; newlines and path separators are refused in one line."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_vpmoe.cli import main as vpmoe_main
from megatron_vpmoe.launch.slurm import SlurmJob, render_sbatch
from megatron_vpmoe.utils.errors import EXIT_FAILURE, EXIT_REQUEUE, UsageError
from helpers.paths import ROOT

CONFIG = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")

STUB = """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_LOG/{name}.args"
echo "{name} ran" >> "$STUB_LOG/calls"
{body}
"""


def _stubs(tmp: Path) -> dict:
    bin_dir, log = tmp / "bin", tmp / "stub-log"
    bin_dir.mkdir()
    log.mkdir()
    bodies = {"srun": 'exit "${STUB_RC:-0}"', "scontrol": 'if [ "$1" = show ]; then echo node-a; fi',
              "sbatch": "echo 1"}
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(STUB.format(name=name, body=body))
        path.chmod(stat.S_IRWXU)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
                SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-a", SLURM_NTASKS="1")


def _run_script(script: str, tmp: Path, env: dict, rc: int = 0) -> subprocess.CompletedProcess:
    path = tmp / "job.sbatch"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], cwd=tmp, env=dict(env, STUB_RC=str(rc)), capture_output=True,
                          text=True, timeout=60)


def _sbatch_args(script: str) -> dict:
    """The ``#SBATCH`` options as sbatch reads them (shell-like words: quotes honoured)."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            words = shlex.split(line[len("#SBATCH "):])
            assert len(words) == 1, line
            key, _, value = words[0].partition("=")
            out[key] = value
    return out


HOSTILE = ["$(touch {d}/INJ_a)", "`touch {d}/INJ_b`", "x; touch {d}/INJ_c", "x' ; touch {d}/INJ_d ; '",
           'x" && touch {d}/INJ_e #', "x && touch {d}/INJ_f", "x | tee {d}/INJ_g", "x > {d}/INJ_h"]


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_values_in_every_field_execute_nothing(tmp_path, pattern):
    evil = pattern.format(d=tmp_path)
    run_dir = tmp_path / f"run dir {evil}"
    config = tmp_path / f"cfg {evil.replace('/', '_')}.yaml"  # the config's path reaches the script too
    config.write_text(Path(CONFIG).read_text())
    job = SlurmJob(config=str(config), overrides=[f"run.dir={json.dumps(str(run_dir))}",  # YAML-quoted: ' #' starts a comment
                                             f"run.name={json.dumps('n' + evil.replace('/', '_'))}",
                                             "train.steps=50"],
                   nodes=1, gpus_per_node=0, partition=evil, account=evil, qos=evil, time=evil,
                   job_name=f"job {evil.replace('/', '_')}", container_image=evil, env=[f"EVIL={evil}"],
                   workdir=str(tmp_path), paths_on_cluster=True)
    script, rendered_dir, name = render_sbatch(job)
    assert Path(rendered_dir) == run_dir.resolve()
    sb = _sbatch_args(script)
    for flag in ("--partition", "--account", "--qos", "--time"):
        assert sb[flag] == evil, flag
    assert sb["--job-name"] == name == f"job {evil.replace('/', '_')}"
    assert sb["--output"] == f"{run_dir}/logs/%x-%j.out"
    env = _stubs(tmp_path)
    res = _run_script(script, tmp_path, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not [p for p in tmp_path.rglob("*INJ_*") if not p.name.startswith("cfg ")], (script, res.stdout)
    # the values reach srun verbatim, as single arguments
    args = (tmp_path / "stub-log" / "srun.args").read_bytes().decode().split("\0")[:-1]
    assert f"--container-image={evil}" in args and str(config) in args
    assert args[args.index("--set", args.index("--config")) + 1] == f"run.dir={json.dumps(str(run_dir))}"
    assert "scontrol ran" in (tmp_path / "stub-log" / "calls").read_text()  # the rendezvous lookup


@pytest.mark.parametrize("argv, names", [
    (["--job-name", "evil\ntouch INJ"], "--job-name"),
    (["--partition", "gpu\ntouch INJ"], "--partition"),
    (["--account", "a\rb"], "--account"),
    (["--qos", "q\x1b[2J"], "--qos"),
    (["--time", "1:00\ntouch INJ"], "--time"),
    (["--container-image", "img\n"], "--container-image"),
    (["--env", "A=1\ntouch INJ"], "--env"),
    (["--set", "run.name=x\ntouch INJ2"], "--set"),
    (["--job-name", "../../x"], "--job-name"),
    (["--set", "run.name=a/b"], "run.name"),
])
def test_control_characters_and_path_separators_are_one_line_exit_2(tmp_path, capsys, argv, names):
    rc = vpmoe_main(["launch", "slurm", "--config", CONFIG, "--nodes", "1", "--gpus-per-node", "0",
                     "--set", f"run.dir={tmp_path}/run", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and names in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_run_name_with_a_newline_in_the_config_file_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    text = Path(CONFIG).read_text().replace("  seed: 1234", '  seed: 1234\n  name: "x\\ntouch INJ2"')
    config.write_text(text)
    with pytest.raises(UsageError, match="run.name"):
        render_sbatch(SlurmJob(config=str(config), overrides=[f"run.dir={tmp_path}/run"], gpus_per_node=0))


def test_run_dir_with_spaces_writes_the_script_and_logs_there(tmp_path):
    run_dir = tmp_path / "my runs" / "a b"
    job = SlurmJob(config=CONFIG, overrides=[f"run.dir={run_dir}"], gpus_per_node=0, job_name="tiny",
                   workdir=str(tmp_path), paths_on_cluster=True)
    script, _, _ = render_sbatch(job)
    assert _sbatch_args(script)["--output"] == f"{run_dir}/logs/%x-%j.out"
    (run_dir / "REQUEUE").parent.mkdir(parents=True)
    (run_dir / "REQUEUE").write_text("")
    res = _run_script(script, tmp_path, _stubs(tmp_path))
    assert res.returncode == 0, res.stderr
    assert not (run_dir / "REQUEUE").exists()  # the marker line found the path with spaces


@pytest.mark.parametrize("code", [EXIT_REQUEUE, EXIT_REQUEUE + 1, EXIT_REQUEUE - 1, EXIT_FAILURE, 0])
def test_script_requeues_exactly_on_the_requeue_exit_code(tmp_path, code):
    run_dir = tmp_path / "run"
    job = SlurmJob(config=CONFIG, overrides=[f"run.dir={run_dir}"], gpus_per_node=0, job_name="tiny",
                   workdir=str(tmp_path), paths_on_cluster=True)
    script, _, _ = render_sbatch(job)
    res = _run_script(script, tmp_path, _stubs(tmp_path), rc=code)
    assert not (run_dir / "REQUEUE").exists()  # no marker: the exit code alone decides
    scontrol = (tmp_path / "stub-log" / "scontrol.args").read_bytes().decode().split("\0")[:-1]
    if code == EXIT_REQUEUE:
        assert scontrol == ["requeue", "4242"] and res.returncode == 0, res.stdout
    else:
        assert scontrol[0] == "show" and res.returncode == code, res.stdout
