"""Distillation from a teacher nobody here wrote: transformers' GptOssForCausalLM with the real
o200k Harmony tokenizer (201,088 tokens), served by `transformers serve` (third-party) and by
`vpmoe serve`.

* the Harmony chat template shipped in the teacher directory renders exactly as openai_harmony;
* recorded teacher replies split into reasoning/final the same way in transformers' response
  parser, our chat_format and openai_harmony, and land in the right role masks of a student's
  shards (student BPE, not o200k);
* the capability probe: transformers serve has chat but neither n nor echo log-probs, vpmoe serve
  has all three; `distill onpolicy` with `loglik` against transformers serve exits 2 with one
  line and writes nothing;
* end to end: generate from transformers serve (killed mid-run, resumed exactly) and from vpmoe
  serve -> build-corpus -> phase-1 student -> on-policy with rank + verify (transformers serve)
  and loglik (vpmoe serve).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.distributed import free_port as _free_port
from helpers.teachers import PY, ServedTeacher, student_tokenizer
from helpers.teachers import cli_env as _env
from helpers.teachers import generated_records as _records
from helpers.paths import FIXTURES

pytestmark = pytest.mark.e2e

# reduced (the CLI default: 4 solutions, 100 steps): 2 solutions + the 2 rankings, 50 steps, enough for
# Harmony-shaped answers and a parseable ranking (30 steps were not: the ranking came back empty)
TEACHER_EXAMPLES, TEACHER_STEPS = 2, 50


@pytest.fixture(scope="session")
def gpt_oss_dir(tmp_path_factory, shared_data) -> Path:
    from megatron_vpmoe.distill.gpt_oss_teacher import build_gpt_oss_teacher

    path = tmp_path_factory.getbasetemp() / "gpt_oss_teacher"
    if not (path / "config.json").is_file():
        build_gpt_oss_teacher(str(shared_data / "kd" / "gsm8k_train.jsonl"), str(path), examples=TEACHER_EXAMPLES,
                              steps=TEACHER_STEPS)
    return path


class TransformersServed(ServedTeacher):
    """`transformers serve DIR` (FastAPI + uvicorn, from transformers' serving extras) as a subprocess."""

    def command(self) -> list:
        exe = Path(sys.executable).parent / "transformers"
        assert exe.is_file(), "transformers' CLI is missing: pip install 'transformers[serving]'"
        return [str(exe), "serve", str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, gpt_oss_dir):
    work = tmp_path_factory.mktemp("gpt_oss_servers")
    hf = TransformersServed(gpt_oss_dir, _free_port(), work / "transformers.log").start()
    ours = ServedTeacher(gpt_oss_dir, _free_port(), work / "vpmoe.log").start()
    yield {"transformers": hf, "vpmoe": ours, "work": work}
    hf.kill()
    ours.kill()


# --- Harmony templates -----------------------------------------------------------------------

def _conversations(shared_data: Path) -> list:
    convs = []
    with open(shared_data / "kd" / "mt_bench_questions.jsonl") as f:
        for _, line in zip(range(3), f):
            turns = json.loads(line)["turns"]
            convs.append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": turns[0]},
                          {"role": "assistant", "content": "Sure.", "reasoning_content": "Keep it short."},
                          {"role": "user", "content": turns[1]}])
    with open(shared_data / "kd" / "self_instruct_seed_messages.jsonl") as f:
        for _, line in zip(range(3), f):
            convs.append(json.loads(line)["messages"])
    return convs


def test_chat_template_renders_like_openai_harmony(shared_data):
    from megatron_vpmoe.data.chat import render_conversation, render_prompt
    from megatron_vpmoe.distill.gpt_oss_teacher import harmony_hf_tokenizer

    tok = harmony_hf_tokenizer()
    for conv in _conversations(shared_data):
        prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == render_prompt(prompt)
        if conv[-1]["role"] == "assistant":
            assert tok.apply_chat_template(conv, tokenize=False) == render_conversation(conv)
    assert len(tok) == 201_088 and tok.convert_tokens_to_ids("<|channel|>") == 200005


def _recorded_replies(shared_data: Path) -> list:
    """Harmony completions (after ``<|start|>assistant``): our GPT-OSS toy's (100 training steps,
    greedy and sampled answers to GSM8K questions through the serve backend, recorded in
    tests/fixtures/gpt_oss_replies.jsonl), and the real GPT-OSS reply of openai/harmony's test
    data (token ids, read in place)."""
    from megatron_vpmoe.data.chat import _harmony

    replies = [json.loads(l)["completion"] for l in (FIXTURES / "gpt_oss_replies.jsonl").open()]
    _, enc = _harmony()
    ids = [int(t) for t in (shared_data / "harmony" / "fixtures" / "test_simple_reasoning_response.txt").read_text().split()]
    return replies + [enc.decode_utf8(ids)]


def test_recorded_replies_split_like_openai_harmony(shared_data):
    """transformers' response parser (our response template), chat_format and openai_harmony agree."""
    from megatron_vpmoe.data.chat import _harmony, render_prompt
    from megatron_vpmoe.distill.gpt_oss_teacher import harmony_hf_tokenizer
    from megatron_vpmoe.data.chat_format import parse_harmony_completion

    oh, enc = _harmony()
    tok = harmony_hf_tokenizer()
    prefix = render_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    for text in _recorded_replies(shared_data):
        msgs = enc.parse_messages_from_completion_tokens(enc.encode(text, allowed_special="all"), oh.Role.ASSISTANT)
        want = {m.channel: "".join(c.text for c in m.content) for m in msgs}
        assert set(want) <= {"analysis", "final"} and want
        split = parse_harmony_completion(text)
        assert (split.reasoning, split.final) == (want.get("analysis"), want.get("final", ""))
        parsed = tok.parse_response(tok.encode(text), prefix=prefix)  # what transformers serve returns
        assert (parsed.get("reasoning_content"), parsed.get("content", "")) == (want.get("analysis"),
                                                                               want.get("final", ""))


def test_channels_land_in_role_masks(tmp_path, shared_data):
    """Recorded replies -> generate records -> build-corpus with a student BPE: the student tokens
    under role 1 are the analysis channel, under role 2 the final channel, as openai_harmony parses
    the rendered conversation."""
    from megatron_vpmoe.data.chat import _harmony, render_conversation
    from megatron_vpmoe.data.shards import read_shard
    from megatron_vpmoe.distill.corpus import build_corpus
    from megatron_vpmoe.tokenizers import load
    from megatron_vpmoe.data.chat_format import parse_harmony_completion

    oh, enc = _harmony()
    student_tokenizer(tmp_path / "student_tok", shared_data)
    gen = tmp_path / "gen"
    gen.mkdir()
    records = []
    for i, text in enumerate(_recorded_replies(shared_data)):
        split = parse_harmony_completion(text)
        records.append({"prompt_id": f"p{i}", "sample_index": 0, "messages": [{"role": "user", "content": f"Q{i}?"}],
                        "reasoning": split.reasoning, "final": split.final, "finish_reason": "stop"})
    (gen / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = build_corpus([str(gen)], str(tmp_path / "corpus"), tokenizers=[str(tmp_path / "student_tok")])
    prefix = result["prefixes"]["student_tok"]
    tokens, roles = read_shard(prefix), read_shard(prefix.replace("_document", "_lossmask_document"))
    student = load(tmp_path / "student_tok").to_hf()
    assert len(tokens) == len(records)
    for i, rec in enumerate(records):
        ids, role = tokens[i].tolist(), roles[i].tolist()
        conv = rec["messages"] + [{"role": "assistant", "content": rec["final"], "thinking": rec["reasoning"]}]
        rendered = enc.encode(render_conversation(conv), allowed_special="all")
        parsed = enc.parse_messages_from_completion_tokens(rendered, None)
        channels = {m.channel: "".join(c.text for c in m.content) for m in parsed if m.author.role == oh.Role.ASSISTANT}
        masked = {r: student.decode([t for t, x in zip(ids, role) if x == r]) for r in (1, 2)}
        if rec["reasoning"]:
            assert masked[1] == channels["analysis"] + "<|end|>"
        else:
            assert masked[1] == "" and "analysis" not in channels
        assert masked[2] == channels["final"] + "<|return|>"
        # the student saw the whole rendering (+ its end-of-document token, unsupervised)
        assert student.decode(ids) == render_conversation(conv) + student.decode(ids[-1:]) and role[-1] == 0


# --- capability probe --------------------------------------------------------------------------

def test_probe_says_what_each_server_serves(servers):
    from megatron_vpmoe.distill.teacher_probe import FEATURES, probe_teacher

    hf = probe_teacher(servers["transformers"].url, list(FEATURES))
    assert hf.features == {"chat": True, "n": False, "echo_logprobs": False}, hf.why
    assert hf.scorers() == ["rank", "critique", "verify"] and "not loglik" in hf.line()
    ours = probe_teacher(servers["vpmoe"].url, list(FEATURES))
    assert ours.features == {"chat": True, "n": True, "echo_logprobs": True}, ours.why
    assert ours.scorers() == ["loglik", "rank", "critique", "verify"] and ours.reasoning_field == "reasoning_content"


def _onpolicy_config(work: Path, name: str, vocab: int, url: str, prompts: Path, steps: int, scorers: str,
                     load=None) -> Path:
    """test_distill_onpolicy_e2e's config (student BPE at ``work/student_tok``), run in ``work/name``."""
    from helpers.teachers import onpolicy_config

    port = int(url.rsplit(":", 1)[1])
    text = onpolicy_config(work, vocab, port, prompts, steps, scorers).read_text().replace(f"{work}/run", f"{work}/{name}")
    # transformers serve answers one request at a time: the scorers' requests queue behind each other
    text = text.replace("sample_table_interval: 10", "sample_table_interval: 1").replace(
        "teacher_timeout_s: 30", "teacher_timeout_s: 300")
    if load:
        text = text.replace("keep_last: 1}", f"keep_last: 1, load: {load}}}")
    path = work / f"{name}.yaml"
    path.write_text(text)
    return path


def test_probe_refuses_loglik_against_transformers_serve(servers, shared_data):
    work = servers["work"]
    vocab = student_tokenizer(work / "student_tok", shared_data)
    prompts = work / "prompts.jsonl"
    with open(shared_data / "kd" / "gsm8k_train.jsonl") as f:
        prompts.write_text("".join(next(f) for _ in range(2)))
    cfg = _onpolicy_config(work, "refuse", vocab, servers["transformers"].url, prompts, 1,
                           "[{kind: verify, weight: 1.0}, {kind: loglik, weight: 1.0}]")
    out = subprocess.run(PY + ["distill", "onpolicy", "--config", str(cfg)], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert out.returncode == 2, out.stderr
    err = [l for l in out.stderr.splitlines() if l.strip()]
    assert "scorer 'loglik' needs" in err[-1] and "echo + logprobs" in err[-1], out.stderr
    assert "-> scorers rank, critique, verify; not loglik" in out.stderr  # the probe's one line
    assert not (work / "refuse").exists()  # nothing written


# --- end to end --------------------------------------------------------------------------------

def _generate_cmd(url: str, prompts: Path, out: Path, limit: int) -> list:
    return PY + ["distill", "generate", "--teacher", url, "--prompts", str(prompts), "--limit", str(limit),
                 "--samples", "2", "--temperature", "0.7", "--max-tokens", "96", "--seed", "5",
                 "--concurrency", "1", "--shard-size", "1", "--retries", "2", "--timeout", "60",
                 "--no-answer-check", "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def generated(servers, shared_data):
    """3 GSM8K prompts x 2 from transformers serve, killed after the first sample and restarted;
    2 x 2 from vpmoe serve."""
    work, hf = servers["work"], servers["transformers"]
    prompts = shared_data / "kd" / "gsm8k_train.jsonl"
    out = work / "gen_transformers"
    cmd = _generate_cmd(hf.url, prompts, out, 3)
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        while not list(out.glob("*-*.jsonl")) and gen.poll() is None:
            time.sleep(0.02)
        hf.kill()  # the third-party teacher dies mid-generation
        _, err = gen.communicate(timeout=120)
    finally:
        if gen.poll() is None:
            gen.kill()
    partial = _records(out)
    assert gen.returncode == 1 and "re-run the same command to resume" in err, err
    assert 0 < len(partial) < 6
    hf.start()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    ours = work / "gen_vpmoe"
    again = subprocess.run(_generate_cmd(servers["vpmoe"].url, prompts, ours, 2), capture_output=True, text=True,
                           env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr
    return {"transformers": out, "vpmoe": ours, "partial": len(partial), "stderr": done.stderr}


def test_generation_from_transformers_serve_resumes_exactly(generated):
    out = generated["transformers"]
    records = _records(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 6  # one record per prompt x sample, across the crash
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_done"] == generated["partial"] and summary["total_done"] == 6
    # transformers serve ignores `n`: the probe saw it, so each sample was its own request
    assert "n no" in generated["stderr"] and "not loglik" in generated["stderr"]
    accepted = [r for r in records if "rejected" not in r]
    assert accepted and all(r["teacher_model"] for r in accepted)
    ours = _records(generated["vpmoe"])
    assert len(ours) == 4 and all(r["final"] is not None for r in ours)


@pytest.fixture(scope="module")
def phase1_student(servers, generated, shared_data):
    """build-corpus over both teachers' samples with the student BPE, then a phase-1 student."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.training.trainer import Trainer

    work = servers["work"]
    vocab = student_tokenizer(work / "student_tok", shared_data)
    out = subprocess.run(PY + ["distill", "build-corpus", "--generated", str(generated["transformers"]),
                               str(generated["vpmoe"]), "--out", str(work / "corpus"),
                               "--tokenizer", str(work / "student_tok")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    shards = work / "corpus" / "kd.student_tok_messages_document"
    cfg_path = work / "phase1.yaml"
    cfg_path.write_text(f"""
run: {{dir: {work}/phase1, seed: 3}}
model: {{vocab_size: {vocab}, hidden_size: 64, num_layers: 2, num_attention_heads: 4,
  num_query_groups: 2, kv_channels: 16, ffn_hidden_size: 128, window_size: 16, moe_first_k_dense: 1,
  num_moe_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 64,
  moe_shared_expert_intermediate_size: 64, moe_router_num_groups: 1, moe_router_group_topk: 1}}
data: {{tokenizer: {work}/student_tok, blend: [[1.0, {shards}]], split: "100,0,0", seq_length: 128}}
train: {{steps: 12, global_batch_size: 4, micro_batch_size: 4, precision: fp32,
  optimizer: {{lr: 0.003, min_lr: 0.0003}}, schedule: {{kind: cosine, warmup_steps: 2}}}}
checkpoint: {{dir: {work}/phase1/ckpt, interval: 12}}
log: {{progress_bar: false}}
""")
    assert Trainer(load_config(str(cfg_path)), quiet=True).run() == 0
    log = [json.loads(l) for l in (work / "phase1" / "metrics.jsonl").open()]
    train = [r for r in log if r.get("kind", "train") == "train" and "loss" in r]
    return {"vocab": vocab, "ckpt": work / "phase1" / "ckpt" / "step_00000012", "train": train}


def test_phase1_student_learns_the_teachers_text(phase1_student):
    train = phase1_student["train"]
    assert len(train) == 12 and phase1_student["ckpt"].is_dir()
    assert sum(r["loss"] for r in train[-3:]) < 0.9 * sum(r["loss"] for r in train[:3]), train


@pytest.mark.parametrize("server,scorers,metric", [
    ("transformers", "[{kind: rank, weight: 1.0}, {kind: verify, weight: 1.0}]", "score_rank"),
    ("vpmoe", "[{kind: loglik, weight: 1.0}]", "score_loglik"),
])
def test_onpolicy_scores_strings_from_the_gpt_oss_teacher(servers, phase1_student, shared_data, server, scorers,
                                                          metric):
    work = servers["work"]
    prompts = work / "prompts.jsonl"
    with open(shared_data / "kd" / "gsm8k_train.jsonl") as f:
        prompts.write_text("".join(next(f) for _ in range(2)))
    cfg = _onpolicy_config(work, f"onpolicy_{server}", phase1_student["vocab"], servers[server].url, prompts, 2,
                           scorers, load=phase1_student["ckpt"])
    out = subprocess.run(PY + ["distill", "onpolicy", "--config", str(cfg)], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr
    metrics = [json.loads(l) for l in (work / f"onpolicy_{server}" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert any(metric in m for m in metrics), metrics  # the teacher scored some student strings
    table = [json.loads(l) for l in (work / f"onpolicy_{server}" / "samples.jsonl").open()]
    assert len(table) == 2 * 8 and any(r["score"] is not None for r in table)  # 2 steps x 2 prompts x 4


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def test_vpmoe_serve_answers_in_vllm_shape(servers):
    """vpmoe serve's GPT-OSS answers have vLLM's fields and types (tests/fixtures/vllm_openai_shapes.json)."""
    from helpers.vllm_shapes import SHAPES, shape_mismatches

    url = servers["vpmoe"].url
    chat = _post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "What is 2 + 2?"}],
                                                "max_tokens": 24, "temperature": 0})
    vllm = json.loads(json.dumps(SHAPES["chat_response"]))  # current vLLM's fields + the older reasoning_content
    vllm["choices"][0]["message"]["reasoning_content"] = SHAPES["chat_response_older"]["choices"][0]["message"][
        "reasoning_content"]
    assert not shape_mismatches(chat, vllm), shape_mismatches(chat, vllm)
    echo = _post(f"{url}/v1/completions", {"prompt": "The answer is 4.", "max_tokens": 0, "echo": True, "logprobs": 1})
    bad = [m for m in shape_mismatches(echo, SHAPES["completion_echo_response"]) if "top_logprobs" not in m]
    assert not bad, bad  # (top_logprobs: null here, vLLM lists them; the client does not read them)
    lp = echo["choices"][0]["logprobs"]
    assert echo["choices"][0]["text"] == "The answer is 4." and len(lp["tokens"]) == len(lp["token_logprobs"]) > 2


def test_toy_teacher_cli_refuses_bad_input(tmp_path, capsys):
    from megatron_vpmoe.cli import main as vpmoe

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\n')  # no answer
    cases = [(["--gsm8k", str(tmp_path / "missing.jsonl")], "no such file"),
             (["--gsm8k", str(bad)], "bad.jsonl:1: not a GSM8K record"),
             (["--gsm8k", str(bad), "--steps", "-1"], "--steps >= 0")]
    for extra, message in cases:
        out = tmp_path / "teacher"
        assert vpmoe(["distill", "toy-teacher", "--arch", "gpt-oss", "--out", str(out)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
