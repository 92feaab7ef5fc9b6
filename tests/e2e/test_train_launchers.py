"""The trainer under each launcher's environment: torchrun, srun-style SLURM variables, mpirun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.distributed import free_port
from helpers.paths import ROOT
from helpers.train_support import read_metrics

pytestmark = pytest.mark.e2e

SUPPORT = str(ROOT / "tests" / "helpers" / "train_support.py")
ARGS = ["train.steps=4", "checkpoint.interval=0", "log.progress_bar=true"]


def _base_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMIX_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _check(run_dir, world):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    state = (Path(run_dir) / "checkpoints" / "step_00000004" / "trainer_state.json").read_text()
    assert f'"world_size": {world}' in state
    assert len(list((Path(run_dir) / "checkpoints" / "step_00000004" / "rng").iterdir())) == world
    for r in records:  # peak memory reduced over every rank: at least rank 0's own, held by a real rank
        assert 0 <= r["peak_memory_rank_argmax"] < world
        assert r["peak_memory_mb_max"] >= 0.99 * r["cpu_max_rss_mb"]
        assert r["tflops_per_gpu"] > 0  # the planner's FLOPs formula over the step time


def test_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), SUPPORT, str(tmp_path), *ARGS]
    out = subprocess.run(cmd, cwd=ROOT, env=_base_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    _check(tmp_path, 2)
    # log.progress_bar=true, but a pipe is not a terminal: rank 0's plain step lines, once, no bar
    assert "\r" not in out.stderr and "train:" not in out.stderr
    assert out.stdout.count("step 4/4 loss") == 1
    assert out.stdout.count("trained steps 0..4") == 1


def test_slurm_environment(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = _base_env()
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, SUPPORT, str(tmp_path), *ARGS], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    _check(tmp_path, 2)


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun")
def test_mpirun(tmp_path):
    env = _base_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root", "-x", "MASTER_ADDR",
           "-x", "MASTER_PORT", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           sys.executable, SUPPORT, str(tmp_path), *ARGS]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    _check(tmp_path, 2)


def test_sigterm_to_torchrun_leaves_checkpoint_and_requeue_marker(tmp_path):
    """torchrun forwards SIGTERM to its workers and reports its own failure code, so the
    REQUEUE marker is how a launcher learns that the run saved and wants a requeue."""
    import signal
    import time

    from megatron_vpmoe.training.checkpoint import latest_checkpoint, read_trainer_state

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), SUPPORT, str(tmp_path), "train.steps=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    marker = (tmp_path / "REQUEUE").read_text()
    step = read_trainer_state(latest_checkpoint(tmp_path / "checkpoints"))["step"]
    assert f"step={step}" in marker and step >= 2


def test_ctrl_c_to_launch_local_saves_the_current_step_and_says_how_to_resume_once(tmp_path):
    """A Ctrl-C in a terminal (SIGINT to the foreground group: the launcher) checkpoints the step
    the ranks are at, like a preemption; one resume hint, no per-rank or torchrun lines."""
    from helpers.terminal import Terminal
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, read_trainer_state

    run = tmp_path / "run"
    tiny = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
            "model.num_query_groups=2", "model.kv_channels=16", "model.ffn_hidden_size=64",
            "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32", "data.seq_length=32",
            "data.mock=true", "data.tokenizer=null", "train.global_batch_size=4", "train.micro_batch_size=1",
            "train.eval_interval=0", "checkpoint.interval=0", f"run.dir={run}", "train.steps=100000"]
    sets = [a for item in tiny for a in ("--set", item)]
    env = {k: v for k, v in _base_env().items() if k != "VPMOE_VERBOSE"}
    term = Terminal([sys.executable, "-m", "megatron_vpmoe.cli", "launch", "local", "--nproc", "2", "--config",
                     str(ROOT / "examples" / "configs" / "tiny-cpu.yaml"), *sets], env, str(tmp_path))
    assert term.wait_for(lambda text: "loss=" in text, timeout=240), term.text[-3000:]  # training, on screen
    term.ctrl_c()
    code = term.finish(timeout=180)
    text = term.text
    assert code == 75, text[-3000:]
    step = read_trainer_state(latest_checkpoint(run / "checkpoints"))["step"]
    assert f"step={step}\n" in (run / "REQUEUE").read_text()
    assert max(r["step"] for r in read_metrics(run)) == step  # the step the ranks were at, not an older one
    assert text.count("run the same command again to resume") == 1
    assert text.count("Ctrl-C again to abort") == 1  # the launcher says it; the ranks do not repeat it
    for noise in ("vpmoe: interrupted", "Traceback", "torch.distributed.elastic", "Sending process", "death signal"):
        assert noise not in text, noise
