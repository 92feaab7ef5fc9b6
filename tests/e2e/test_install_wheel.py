"""A built wheel works outside the checkout: `vpmoe launch slurm --dry-run`, `vpmoe config show`
and a 2-step tiny `vpmoe train` from a temporary directory, with no top-level `kernels` module.

Cheap by design: the wheel is built without build isolation and installed with `--no-deps` into
a fresh venv (no pip of its own); the dependencies (torch, megatron-core, ...) come from this
interpreter's site-packages through a `.pth` line added after the install, so only the package
itself comes from the wheel."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tarfile
import zipfile

import pytest

from helpers.paths import ROOT

pytestmark = pytest.mark.e2e

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=2", "model.kv_channels=16", "model.ffn_hidden_size=64",
        "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32", "data.seq_length=32",
        "data.mock=true", "data.tokenizer=null", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.schedule.warmup_steps=1", "train.eval_interval=0", "train.steps=2", "run.dir=run"]


def _run(cmd, cwd, env, timeout=300):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    # the working tree as git sees it (tracked + new files, links kept), so the build writes nothing here
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    with tarfile.open(tmp_path / "src.tar", "w") as tar:
        for name in filter(None, files):
            if os.path.lexists(ROOT / name):
                tar.add(ROOT / name, arcname=name, recursive=False)
    with tarfile.open(tmp_path / "src.tar") as tar:
        tar.extractall(src, filter="tar")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("megatron_vpmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"megatron_vpmoe", wheel.name.split("-py3")[0] + ".dist-info"}
    for packaged in ("megatron_vpmoe/kernels/ops.py", "megatron_vpmoe/launch/templates/vpmoe.sbatch",
                     "megatron_vpmoe/plan/gpus/h100-80gb.yaml", "megatron_vpmoe/model/hf_template/modeling_vpmoe.py",
                     "megatron_vpmoe/data/default/SOURCES.md", "megatron_vpmoe/data/default/corpora/tinyshakespeare.txt"):
        assert packaged in names, packaged

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    vpy = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", str(wheel)], tmp_path, env)
    purelib = _run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip()
    with open(os.path.join(purelib, "zz_reuse_deps.pth"), "w") as pth:  # after the install: pip saw an empty venv
        pth.write("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "work"  # no checkout, no ../shared around it
    work.mkdir()
    (work / "tiny.yaml").write_text((ROOT / "examples" / "configs" / "tiny-cpu.yaml").read_text())
    env.update(OMP_NUM_THREADS="1", VPMOE_DATA="", TIKTOKEN_ENCODINGS_BASE="")
    where = _run([str(vpy), "-c", "import importlib.util as u, megatron_vpmoe.kernels as k; print(k.__file__); "
                                  "s = u.find_spec('kernels'); print(s.origin if s else None)"], work, env).split()
    # ours; a top-level `kernels`, if any, is Hugging Face's (a transformers dependency), never from our wheel
    assert where[0].startswith(purelib) and not where[1].startswith(os.path.join(purelib, "kernels")), where
    vpmoe = str(venv / "bin" / "vpmoe")
    script = _run([vpmoe, "launch", "slurm", "--config", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                   "--paths-on-cluster", "--dry-run"], work, env)
    assert "#SBATCH" in script and "srun" in script and "megatron_vpmoe.cli train" in script
    shown = _run([vpmoe, "config", "show", "tiny.yaml"], work, env)
    assert "hidden_size" in shown
    sets = [a for s in TINY for a in ("--set", s)]
    _run([vpmoe, "train", "--config", "tiny.yaml", *sets], work, env)
    assert (work / "run" / "checkpoints" / "latest").is_file()
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) >= 2
