"""Launchers for real: a one-node SLURM cluster runs a 2-rank training job, a preemption notice
(USR1 to the batch shell, as `--signal=B:USR1@N` sends it) checkpoints, requeues and resumes to
the same losses as an uninterrupted run; mpirun and torchrun run the same training; the
4-node x 8-GPU script is checked without submitting."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.slurm_cluster import start_cluster, stop_cluster
from helpers.paths import ROOT

pytestmark = pytest.mark.e2e

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=1", "model.kv_channels=16", "model.ffn_hidden_size=64",
        "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32", "data.seq_length=32",
        "data.mock=true", "data.tokenizer=null", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.schedule.warmup_steps=2", "train.eval_interval=0", "log.progress_bar=false",
        "checkpoint.interval=0"]
CONFIG = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")


def _sets(run_dir, steps, extra=()):
    out = []
    for item in [*TINY, f"run.dir={run_dir}", f"train.steps={steps}", *extra]:
        out += ["--set", item]
    return out


def _vpmoe(*args, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r}


def test_sbatch_for_4_nodes_x_8_gpus(tmp_path):
    out = _vpmoe("launch", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time",
                 "24:00:00", "--account", "proj", "--env", "WANDB_MODE=offline", "--config", CONFIG,
                 "--set", f"run.dir={tmp_path}/run", "--set", "train.global_batch_size=128", "--paths-on-cluster",
                 "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00", "#SBATCH --account=proj",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "export WANDB_MODE=offline",
                 "scontrol requeue"):
        assert line in script, line
    assert "= 32 ranks" in script
    assert not (tmp_path / "run" / "launch").exists()  # dry run writes nothing
    # run the script's rendezvous lines against a fake scontrol: the first node of the list wins
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\ngpu-b02\\ngpu-b03\\n'\n")
    (fake / "scontrol").chmod(stat.S_IRWXU)
    lines = [ln for ln in script.splitlines() if ln.startswith("export MASTER_")]
    probe = "\n".join(lines) + '\necho "$MASTER_ADDR:$MASTER_PORT"\n'
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18],gpu-b[02-03]",
               SLURM_JOB_ID="123456")
    res = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True)
    assert res.stdout.strip() == f"gpu-a17:{20000 + 123456 % 20000}"


def test_slurm_layout_errors_before_submitting(tmp_path):
    out = _vpmoe("launch", "slurm", "--nodes", "1", "--gpus-per-node", "3", "--config", CONFIG,
                 "--set", "parallel.tensor=2", "--set", f"run.dir={tmp_path}", "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "parallel" in out.stderr


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    stop_cluster(cluster)


def _submit(slurm, run_dir, steps, extra=()):
    env_conf = ["--env", f"SLURM_CONF={slurm.env['SLURM_CONF']}"]
    cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "launch", "slurm", "--nodes", "1", "--gpus-per-node", "0",
           "--ntasks-per-node", "2", "--job-name", "tiny", "--signal-seconds", "60", *env_conf, "--config", CONFIG,
           "--paths-on-cluster",  # the real-failure case names a missing shard on purpose
           *_sets(run_dir, steps, extra)]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(slurm.env, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[2].rstrip(":")


@pytest.mark.slurm
def test_slurm_job_trains_two_ranks(slurm, tmp_path):
    run = tmp_path / "run"
    job = _submit(slurm, run, 6)
    info = slurm.wait(job, timeout=240)
    log = (run / "logs" / f"tiny-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "2 ranks" in log and "trained steps 0..6" in log
    assert sorted(_losses(run)) == list(range(1, 7))


@pytest.mark.slurm
def test_slurm_preemption_requeues_and_resumes_exactly(slurm, tmp_path):
    steps = 60
    reference = tmp_path / "reference"
    out = _vpmoe("launch", "local", "--nproc", "2", "--config", CONFIG, *_sets(reference, steps))
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "run"
    job = _submit(slurm, run, steps)
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until training is under way, then send the notice
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 3:
            break
        time.sleep(0.05)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    # SLURM holds a requeued job for about two minutes (its BeginTime); let it start now
    deadline = time.time() + 120
    while time.time() < deadline:
        info = slurm.job(job)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            # the first run must be gone from the node, and slurmd rejects a launch credential
            # issued in the same second as the requeue revoked the old one ("credential revoked")
            while time.time() < deadline and slurm.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle":
                time.sleep(0.2)
            time.sleep(2)
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            break
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.2)
    info = slurm.wait(job, timeout=300)
    log = (run / "logs" / f"tiny-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "requeueing job" in log and int(info.get("Restarts", 0)) == 1, log
    assert "(restart 1)" in log
    losses, expected = _losses(run), _losses(reference)
    assert sorted(losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    assert not (run / "REQUEUE").exists()


@pytest.mark.mpi
def test_mpirun_and_torchrun_give_the_same_run(tmp_path):
    if subprocess.run(["which", "mpirun"], capture_output=True).returncode:
        pytest.skip("mpirun not installed (tests/install_system_deps.sh installs OpenMPI)")
    a, b = tmp_path / "mpi", tmp_path / "torchrun"
    out = _vpmoe("launch", "mpi", "--np", "2", "--config", CONFIG, *_sets(a, 4))
    assert out.returncode == 0, out.stdout + out.stderr
    out = _vpmoe("launch", "local", "--nproc", "2", "--config", CONFIG, *_sets(b, 4))
    assert out.returncode == 0, out.stdout + out.stderr
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == [1, 2, 3, 4]
    assert all(la[s] == pytest.approx(lb[s], rel=1e-6) for s in la)


def test_local_launcher_turns_usr1_into_a_checkpoint_and_exit_75(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_vpmoe.cli", "launch", "local", "--nproc", "2",
                             "--config", CONFIG, *_sets(run, 100000)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(_losses(run)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output
    assert "run the same command again to resume" in output
    assert (run / "REQUEUE").is_file() and (run / "checkpoints" / "latest").is_file()


@pytest.mark.slurm
def test_slurm_real_failure_is_not_requeued(slurm, tmp_path):
    run = tmp_path / "run"
    job = _submit(slurm, run, 4, extra=["data.mock=false", f"data.blend=[[1.0, {tmp_path}/missing_document]]"])
    info = slurm.wait(job, timeout=240)
    log = (run / "logs" / f"tiny-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and int(info.get("Restarts", 0)) == 0, log
    assert "missing_document" in log and "requeueing" not in log
