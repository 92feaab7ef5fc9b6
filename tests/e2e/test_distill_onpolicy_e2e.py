"""On-policy distillation end to end on CPU: a tiny VPMoE student (its own BPE from `vpmoe tokenizer train`, trained
on Shakespeare) samples answers to GSM8K prompts; the toy GSM8K teacher served by `vpmoe serve`
(a different tokenizer, and preferences the student does not share) scores the strings by
per-byte log-likelihood; GRPO updates raise the teacher's mean score while the KL to the frozen
reference stays bounded. Also: the CLI resumes from its checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from helpers.distributed import free_port as _free_port
from helpers.teachers import PY, ServedTeacher, onpolicy_config, student_tokenizer, toy_teacher_dir
from helpers.teachers import cli_env as _env

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("o200k")]  # the toy teacher renders Harmony


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("onpolicy")
    vocab = student_tokenizer(work / "student_tok", shared_data)
    prompts = work / "prompts.jsonl"
    with open(shared_data / "kd" / "gsm8k_train.jsonl") as f:
        prompts.write_text("".join(next(f) for _ in range(4)))
    port = _free_port()
    teacher = toy_teacher_dir(tmp_path_factory, shared_data)
    (work / "teacher").symlink_to(teacher)  # its own 400-token BPE: loglik's teacher_tokenizer
    server = ServedTeacher(teacher, port, work / "serve.log").start()
    yield work, vocab, port, prompts
    server.kill()


def test_teacher_score_rises_with_bounded_kl(setup):
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.distill.onpolicy import OnPolicyTrainer

    work, vocab, port, prompts = setup
    cfg = load_config(str(onpolicy_config(work, vocab, port, prompts, steps=30, teacher_tokenizer=work / "teacher")))
    history = OnPolicyTrainer(cfg, quiet=True).run()
    scores = [h["teacher_score"] for h in history]
    first, last = sum(scores[:6]) / 6, sum(scores[-6:]) / 6
    assert last > first + 0.3, scores  # per-byte teacher log-likelihood rises
    kls = [h["kl"] for h in history]
    assert max(kls) < 1.0 and kls[-1] > 0  # the student moved, but stayed near the reference
    assert sum(h["dropped"] for h in history) < 60  # empty answers are dropped and counted
    metrics = [json.loads(l) for l in (work / "run" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    table = [json.loads(l) for l in (work / "run" / "samples.jsonl").open()]
    assert len(table) == 3 * 8 and {"prompt", "completion", "score"} <= set(table[0])
    shutil.rmtree(work / "run")


def test_cli_resumes_and_mixes_scorers(setup, capsys):
    from megatron_vpmoe.cli import main as vpmoe

    work, vocab, port, prompts = setup
    scorers = "[{kind: loglik, weight: 1.0}, {kind: verify, weight: 2.0}]"
    for steps in (1, 2):
        cfg = onpolicy_config(work, vocab, port, prompts, steps, scorers, teacher_tokenizer=work / "teacher")
        out = subprocess.run(PY + ["distill", "onpolicy", "--config", str(cfg)], capture_output=True,
                             text=True, env=_env(), timeout=300)
        assert out.returncode == 0, out.stderr
    assert "on-policy steps 2..2" in out.stdout  # the second run resumed at step 2
    metrics = [json.loads(l) for l in (work / "run" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2] and "score_verify" in metrics[-1]
    assert vpmoe(["distill", "onpolicy", "--config", str(cfg),
                  "--set", "distill.onpolicy.samples_per_prompt=1"]) == 2
    assert "distill.onpolicy.samples_per_prompt" in capsys.readouterr().err


def _dp_worker(rank, world_size, cfg_path):
    import torch

    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.distill.onpolicy import OnPolicyTrainer

    trainer = OnPolicyTrainer(load_config(cfg_path), quiet=True)
    history = trainer.run()
    flat = torch.cat([p.detach().flatten() for p in trainer.pm.parameters()])
    return [h["teacher_score"] for h in history], flat.tolist()  # no tensors through the queue


def test_data_parallel_ranks_stay_in_sync(setup):
    """Two gloo ranks split each step's prompts; DDP keeps their weights identical; rank 0
    logs the scores reduced over both ranks; the checkpoint is written once."""
    from helpers.distributed import run_distributed

    work, vocab, port, prompts = setup
    cfg = onpolicy_config(work, vocab, port, prompts, steps=2, teacher_tokenizer=work / "teacher")
    text = cfg.read_text().replace(f"{work}/run", f"{work}/dp")
    cfg.write_text(text)
    (s0, w0), (s1, w1) = run_distributed(_dp_worker, 2, str(cfg), timeout=300)
    assert s0 == s1 and len(s0) == 2  # metrics are all-reduced
    assert w0 == w1
    metrics = [json.loads(l) for l in (work / "dp" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (work / "dp" / "ckpt" / "step_00000002").is_dir()


def test_nll_anchor_on_phase1_data(setup, shared_data):
    """With nll_anchor_coeff > 0 the update also fits phase-1 chat data (here GSM8K worked
    solutions as assistant reasoning + final, preprocessed into role-masked shards and read through
    data.blend): its NLL is logged and falls."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.distill.onpolicy import OnPolicyTrainer
    from megatron_vpmoe.data.preprocess import PreprocessOptions, run_preprocess

    work, vocab, port, prompts = setup
    records = work / "phase1_records.jsonl"
    with open(shared_data / "kd" / "gsm8k_train.jsonl") as f, open(records, "w") as out:
        for _, line in zip(range(24), f):
            rec = json.loads(line)
            work_text, answer = rec["answer"].rsplit("####", 1)
            out.write(json.dumps({"messages": [
                {"role": "user", "content": rec["question"]},
                {"role": "assistant", "thinking": work_text.strip(), "content": answer.strip()}]}) + "\n")
    run_preprocess(PreprocessOptions([str(records)], str(work / "phase1"), {"student": str(work / "student_tok")},
                                     json_keys=["messages"], progress=False))
    shards = f"{work}/phase1.student_messages_document"
    cfg = onpolicy_config(work, vocab, port, prompts, steps=10, teacher_tokenizer=work / "teacher")
    cfg.write_text(cfg.read_text().replace(f"{work}/run", f"{work}/anchor")
                   .replace("mock: true, seq_length: 64", f"blend: [[1.0, {shards}]], split: '100,0,0', seq_length: 256")
                   .replace("kl_coeff: 0.05,", "kl_coeff: 0.05, nll_anchor_coeff: 1.0,"))
    cfg = load_config(str(cfg))
    cfg.train.micro_batch_size = 4
    history = OnPolicyTrainer(cfg, quiet=True).run()
    nll = [h["anchor_nll"] for h in history]
    assert len(nll) == 10 and sum(nll[-3:]) < 0.8 * sum(nll[:3]), nll
