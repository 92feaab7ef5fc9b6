"""Phase-1 distillation end to end on CPU with a real served teacher.

toy teacher (trained here) -> `vpmoe serve` subprocess -> `vpmoe distill generate` subprocess
on GSM8K prompts -> the server is killed mid-generation -> restarted -> the same command resumes
to exactly one record per prompt x sample -> `vpmoe distill build-corpus` (chat records, blend
snippet, `vpmoe preprocess` shards with assistant-only role masks in a student tokenizer) -> a
student with that different tokenizer trained by `vpmoe train`'s trainer on the shards: loss falls.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from helpers.distributed import free_port as _free_port
from helpers.teachers import PY, ServedTeacher, student_tokenizer, toy_teacher_dir
from helpers.teachers import cli_env as _env
from helpers.teachers import generated_records as _records

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("o200k")]  # the teacher and the chat shards render Harmony


@pytest.fixture(scope="module")
def generated(tmp_path_factory, shared_data):
    """Teacher samples for 6 GSM8K prompts x 2, generated across a teacher crash."""
    work = tmp_path_factory.mktemp("distill_e2e")
    teacher_dir = toy_teacher_dir(tmp_path_factory, shared_data)
    port = _free_port()
    out = work / "gen"
    cmd = PY + ["distill", "generate", "--teacher", f"http://127.0.0.1:{port}",
                "--prompts", str(shared_data / "kd" / "gsm8k_train.jsonl"), "--limit", "6",
                "--samples", "2", "--temperature", "0.5", "--max-tokens", "160", "--seed", "3",
                "--concurrency", "1", "--shard-size", "1", "--retries", "2", "--timeout", "20",
                "--out", str(out), "--no-progress"]
    server = ServedTeacher(teacher_dir, port, work / "serve.log").start()
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        while not list(out.glob("*-*.jsonl")) and gen.poll() is None:  # first sample on disk
            time.sleep(0.02)
        server.kill()  # the teacher dies mid-generation
        _, err = gen.communicate(timeout=120)
    finally:
        server.kill()
        if gen.poll() is None:
            gen.kill()
    partial = _records(out)
    assert gen.returncode == 1, err
    assert "re-run the same command to resume" in err and 0 < len(partial) < 12

    server = ServedTeacher(teacher_dir, port, work / "serve.log").start()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        server.kill()
    assert done.returncode == 0, done.stderr
    return {"out": out, "partial": len(partial), "summary": done.stdout, "work": work}


def test_generation_survives_teacher_crash(generated):
    out = generated["out"]
    records = _records(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 12  # exactly one record per prompt x sample
    assert {k[0] for k in keys} == {f"gsm8k_train.jsonl:{i}" for i in range(1, 7)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_done"] == generated["partial"] and summary["total_done"] == 12
    accepted = [r for r in records if "rejected" not in r]
    # the toy teacher memorised the first 4 problems: some samples pass the answer check
    assert accepted and all(r["reasoning"] and r["final"] for r in accepted)
    for r in accepted:
        assert r["reference"] in r["final"] and r["teacher_model"] == "toy_teacher"
    assert not list(out.glob(".*tmp*"))  # no half-written shards left behind


@pytest.fixture(scope="module")
def corpus(generated, shared_data):
    work = generated["work"]
    vocab = student_tokenizer(work / "student_tok", shared_data)
    out = subprocess.run(PY + ["distill", "build-corpus", "--generated", str(generated["out"]),
                               "--out", str(work / "corpus"), "--tokenizer", str(work / "student_tok"),
                               "--distill-weight", "0.7", "--mid-training",
                               "0.3:shards/web.{variant}_text_document", "--records-only"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return {"dir": work / "corpus", "tok": work / "student_tok", "vocab": vocab, "work": work}


def test_build_corpus_records_and_blend(generated, corpus):
    import yaml

    records = [json.loads(l) for l in (corpus["dir"] / "chat_records.jsonl").open()]
    accepted = [r for r in _records(generated["out"]) if "rejected" not in r]
    assert len(records) == len(accepted)
    for rec in records:
        user, assistant = rec["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["thinking"] and assistant["content"]
    snippet = yaml.safe_load((corpus["dir"] / "blend.student_tok.yaml").read_text())
    assert snippet["data"]["blend"] == [
        [0.7, str(corpus["dir"] / "kd.student_tok_messages_document")],
        [0.3, "shards/web.student_tok_text_document"]]
    assert snippet["distill"] == {"reasoning_loss_weight": 1.0, "final_loss_weight": 1.0}


@pytest.fixture(scope="module")
def kd_shards(corpus):
    """``build-corpus`` with a student tokenizer: chat records -> ``vpmoe preprocess`` shards with
    assistant-only role masks."""
    from megatron_vpmoe.cli import main as vpmoe

    assert vpmoe(["distill", "build-corpus", "--generated", str(corpus["work"] / "gen"),
                  "--out", str(corpus["dir"]), "--tokenizer", str(corpus["tok"])]) == 0
    return str(corpus["dir"] / "kd.student_tok_messages_document")


def test_preprocess_with_student_tokenizer(kd_shards):
    from megatron_vpmoe.data.shards import read_shard

    tokens, roles = read_shard(kd_shards), read_shard(kd_shards.replace("_document", "_lossmask_document"))
    assert len(tokens) == len(roles) > 0
    for i in range(len(tokens)):
        assert len(tokens[i]) == len(roles[i])
        assert {1, 2} <= set(roles[i].tolist())  # reasoning and final spans of every teacher answer


def test_student_loss_on_teacher_text_falls(corpus, kd_shards):
    import torch

    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.training.trainer import Trainer

    work = corpus["work"]
    cfg_path = work / "student.yaml"
    cfg_path.write_text(f"""
run: {{dir: {work}/student, seed: 3}}
model: {{vocab_size: {corpus["vocab"]}, hidden_size: 64, num_layers: 2, num_attention_heads: 4,
  num_query_groups: 2, kv_channels: 16, ffn_hidden_size: 128, window_size: 16, moe_first_k_dense: 1,
  num_moe_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 64,
  moe_shared_expert_intermediate_size: 64, moe_router_num_groups: 1, moe_router_group_topk: 1}}
data: {{tokenizer: {corpus["tok"]}, blend: [[1.0, {kd_shards}]], split: "100,0,0", seq_length: 256}}
train: {{steps: 40, global_batch_size: 4, micro_batch_size: 4, precision: fp32,
  optimizer: {{lr: 0.003, min_lr: 0.0003}}, schedule: {{kind: cosine, warmup_steps: 2}}}}
checkpoint: {{interval: 0}}
log: {{progress_bar: false}}
distill: {{reasoning_loss_weight: 1.0, final_loss_weight: 2.0}}
""")
    torch.set_num_threads(1)
    cfg = load_config(str(cfg_path))
    assert Trainer(cfg, quiet=True).run() == 0
    log = [json.loads(l) for l in (work / "student" / "metrics.jsonl").open()]
    train = [r for r in log if r.get("kind", "train") == "train" and "loss" in r]
    assert len(train) == 40 and all({"nll_reasoning", "nll_final"} & set(r) for r in train)
    # packed 256-token windows: most batches hold both spans, every batch holds one of them
    assert sum({"nll_reasoning", "nll_final"} <= set(r) for r in train) >= 20
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.8 * first, (first, last)
