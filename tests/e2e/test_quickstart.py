"""`make quickstart`'s script end to end in its reduced scale (QUICKSTART_SCALE=small, ~2 minutes),
from a fresh `git clone` of the committed HEAD in a temporary folder with no `../shared` beside it
(so on the data embedded in the package): tokenizers -> preprocess -> 2-process pretraining ->
served teacher -> phase-1 distillation -> on-policy steps -> Hugging Face conversion -> eval; a
second run resumes and skips the done work. The teacher's o200k ranks come from
TIKTOKEN_ENCODINGS_BASE (what tiktoken's cache stands in for on a user's machine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers.needs import need_o200k
from helpers.paths import ROOT

pytestmark = pytest.mark.e2e


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_small_in_a_clone_without_shared_data(tmp_path):
    ranks = need_o200k()
    clone = tmp_path / "clone"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True, timeout=120)
    subprocess.run(["git", "checkout", "-q", head.strip()], cwd=clone, check=True, timeout=120)
    assert not (tmp_path / "shared").exists()
    qs = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k != "VPMOE_DATA"}
    env.update(QS=str(qs), QUICKSTART_SCALE="small", QUICKSTART_PORT=str(_port()), TIKTOKEN_ENCODINGS_BASE=str(ranks.parent),
               VPMOE=f"{sys.executable} -m megatron_vpmoe.cli", PY=sys.executable, PYTHONPATH=str(clone))
    out = subprocess.run(["bash", str(clone / "examples" / "quickstart.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "quickstart done" in out.stdout
    for notice in ("Transformer Engine and Apex are not installed", "path_to_cache is None", "`loss_type=None`",
                   "torch.distributed is disabled",  # filtered by utils/notices.py
                   "Building a BlendedDataset for a single MegatronDataset", "CUDA_DEVICE_MAX_CONNECTIONS",
                   "all_to_all_single is deprecated", "to instantiate a model of type", "torch.distributed.elastic"):
        assert notice not in out.stdout + out.stderr, notice
    assert "\r" not in out.stdout + out.stderr  # no progress bar in a log (transformers' included)
    assert str(clone / "megatron_vpmoe" / "data" / "default") in out.stdout  # the embedded data, not ../shared
    report = json.loads((qs / "tokenizer-report" / "report.json").read_text())
    assert len(report if isinstance(report, list) else report["tokenizers"]) == 2
    summary = json.loads((qs / "shards" / "corpus.summary.json").read_text())
    assert set(summary["tokens_per_variant"]) == {"bpe-8k", "lengthmax-8k"}
    pretrain = [json.loads(x) for x in (qs / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in pretrain) == 20
    assert (qs / "kd" / "corpus" / "kd.bpe-8k_messages_lossmask_document.idx").is_file()
    assert (qs / "phase1" / "checkpoints" / "latest").is_file()
    assert (qs / "onpolicy" / "checkpoints" / "latest").is_file()
    results = json.loads((qs / "eval" / "results.json").read_text())
    assert {"bpb", "copa", "piqa"} <= set(results["tasks"] if "tasks" in results else results)
    # re-running resumes: nothing is retrained or regenerated
    again = subprocess.run(["bash", str(clone / "examples" / "quickstart.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "up to date" in again.stdout and "trained steps 20..20" in again.stdout
    assert "0 accepted" in again.stdout and "done before" in again.stdout
