"""`vpmoe serve`: the OpenAI-compatible API on a toy Harmony teacher (in-process aiohttp server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from megatron_vpmoe.serve.chat_format import parse_harmony_completion, render_harmony_prompt


def toy_teacher_dir(tmp_path_factory, shared_data: Path) -> Path:
    """Build the toy Harmony teacher once per test session (also used by test_distill*)."""
    from megatron_vpmoe.distill.toy_teacher import build_toy_teacher

    path = tmp_path_factory.getbasetemp() / "toy_teacher"
    if not (path / "config.json").is_file():
        torch.set_num_threads(1)
        build_toy_teacher(str(shared_data / "kd" / "gsm8k_train.jsonl"), str(path))
    return path


@pytest.fixture(scope="module")
def backend(tmp_path_factory, shared_data):
    from megatron_vpmoe.serve.backends import HFBackend

    return HFBackend(str(toy_teacher_dir(tmp_path_factory, shared_data)), model_id="toy")


def _with_server(backend, body, **server_kwargs):
    """Run ``body(client)`` against an in-process server; returns (body's result, server)."""
    from aiohttp.test_utils import TestClient, TestServer

    from megatron_vpmoe.serve.app import OpenAIServer

    server = OpenAIServer(backend, **server_kwargs)

    async def main():
        async with TestClient(TestServer(server.app())) as client:
            return await body(client)

    return asyncio.run(main()), server


async def _post(client, path, payload):
    resp = await client.post(path, json=payload)
    return resp.status, await resp.json()


def test_harmony_render_and_parse_round_trip():
    prompt = render_harmony_prompt([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "2+2?"}])
    assert prompt.startswith("<|start|>system<|message|>") and prompt.endswith("<|start|>assistant")
    assert "Be brief." in prompt and "<|start|>user<|message|>2+2?<|end|>" in prompt
    split = parse_harmony_completion(
        "<|channel|>analysis<|message|>two and two<|end|><|start|>assistant<|channel|>final"
        "<|message|>4<|return|>")
    assert (split.reasoning, split.final, split.parsed) == ("two and two", "4", True)
    raw = parse_harmony_completion("no channels here")
    assert raw.parsed is False and raw.final == "no channels here" and raw.reasoning is None


def test_models_completions_echo_and_errors(backend):
    prompt = "Natalia sold clips to 48 of her friends"

    async def body(client):
        models = await (await client.get("/v1/models")).json()
        scored = await _post(client, "/v1/completions",
                             {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
        ids = backend.encode(prompt)
        by_ids = await _post(client, "/v1/completions",
                             {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 1, "n": 2})
        seeded = [await _post(client, "/v1/completions",
                              {"prompt": prompt, "max_tokens": 8, "seed": 7, "temperature": 1.0})
                  for _ in range(2)]
        stopped = await _post(client, "/v1/completions",
                              {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [" "]})
        bad = [await _post(client, "/v1/completions", p) for p in
               ({"prompt": prompt, "max_tokens": -1}, {"prompt": []}, {"prompt": "x", "top_p": 2},
                {"prompt": "x", "n": "two"}, {"prompt": [1, 10**6]}, {"prompt": "x", "stop": 3},
                {"prompt": "x", "stream": True})]
        not_json = await client.post("/v1/completions", data=b"{oops")
        return models, scored, by_ids, seeded, stopped, bad, not_json.status

    (models, scored, by_ids, seeded, stopped, bad, not_json), _ = _with_server(backend, body)
    assert models["data"][0]["id"] == "toy"

    status, data = scored
    assert status == 200
    lp = data["choices"][0]["logprobs"]
    ids = backend.encode(prompt)
    assert data["choices"][0]["text"] == prompt and data["usage"]["completion_tokens"] == 0
    assert "".join(lp["tokens"]) == prompt and len(lp["token_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["text_offset"][0] == 0
    with torch.no_grad():  # echo log-probs equal a direct forward of the model
        logits = backend.model(torch.tensor([ids])).logits[0].float()
    expect = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), expect, atol=1e-4)

    status, data = by_ids
    assert status == 200 and len(data["choices"]) == 2
    greedy = data["choices"][0]
    assert greedy["text"] == data["choices"][1]["text"]  # temperature 0: identical samples
    # the greedy text continues the prompt with the model's argmax tokens
    seq = list(ids)
    for _ in range(len(greedy["logprobs"]["tokens"])):
        with torch.no_grad():
            seq.append(int(backend.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert backend.decode(seq[len(ids):]) == greedy["text"]
    assert data["usage"]["prompt_tokens"] == len(ids)

    assert seeded[0][1]["choices"][0]["text"] == seeded[1][1]["choices"][0]["text"]
    status, data = stopped
    assert status == 200 and " " not in data["choices"][0]["text"]
    assert data["choices"][0]["finish_reason"] == "stop"
    for status, err in bad:
        assert status == 400 and err["error"]["message"]
    assert not_json == 400


def test_chat_completions_harmony_channels(backend, shared_data):
    rec = json.loads((shared_data / "kd" / "gsm8k_train.jsonl").open().readline())

    async def body(client):
        return await _post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": rec["question"]}], "max_tokens": 200,
            "temperature": 0})

    (status, data), _ = _with_server(backend, body)
    assert status == 200
    msg = data["choices"][0]["message"]
    # the toy teacher memorised this problem: reasoning in analysis, the number in final
    assert msg["role"] == "assistant" and "72" in msg["content"]
    assert msg["reasoning_content"] and "48/2" in msg["reasoning_content"]
    assert "<|" not in msg["content"] and data["choices"][0]["finish_reason"] == "stop"
    bad_role = _with_server(backend, lambda c: _post(c, "/v1/chat/completions", {
        "messages": [{"role": "wizard", "content": "hi"}]}))[0]
    assert bad_role[0] == 400 and "wizard" in bad_role[1]["error"]["message"]


def test_concurrent_requests_are_batched_with_unchanged_results(backend):
    prompts = ["Weng earns", "Betty is saving", "Julie is reading", "James writes",
               "Mark has a garden", "Albert is wondering"]

    async def sequential(client):
        return [(await _post(client, "/v1/completions",
                             {"prompt": p, "max_tokens": 8, "temperature": 0}))[1] for p in prompts]

    async def concurrent(client):
        return await asyncio.gather(*(_post(client, "/v1/completions",
                                            {"prompt": p, "max_tokens": 8, "temperature": 0})
                                      for p in prompts))

    one_by_one, s1 = _with_server(backend, sequential, window_ms=1.0)
    together, s2 = _with_server(backend, concurrent, window_ms=50.0)
    assert s1.queue.stats.calls == len(prompts)
    assert s2.queue.stats.calls < len(prompts) and s2.queue.stats.max_rows > 1
    for a, (status, b) in zip(one_by_one, together):
        assert status == 200
        assert a["choices"][0]["text"] == b["choices"][0]["text"]  # left padding changes nothing


def test_load_backend_errors(tmp_path):
    from megatron_vpmoe.serve.backends import load_backend
    from megatron_vpmoe.utils.errors import InputError

    with pytest.raises(InputError, match="no such"):
        load_backend(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not a loadable"):
        load_backend(str(tmp_path / "bad"))


def test_vpmoe_checkpoint_backend(tmp_path, shared_data):
    """A `vpmoe train`-style checkpoint served: greedy generation equals the model's own
    KV-cache generation, echo log-probs equal teacher-forced `sequence_logprobs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_vpmoe.config import VpmoeConfig, dump_config
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.model.generation import generate, sequence_logprobs
    from megatron_vpmoe.serve.backends import load_backend
    from megatron_vpmoe.training.checkpoint import CheckpointManager
    from megatron_vpmoe.training.optimizer import build_optimizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([(shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:20_000]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(tmp_path / "tok")
    cfg = VpmoeConfig()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads = len(tok), 32, 2, 2
    m.num_query_groups, m.kv_channels, m.ffn_hidden_size, m.window_size = 1, 16, 64, 8
    m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size = 4, 32, 32
    m.moe_router_topk, m.moe_router_num_groups, m.moe_router_group_topk = 2, 1, 1
    cfg.data.mock, cfg.data.tokenizer = True, str(tmp_path / "tok")
    cfg.validate()
    torch.manual_seed(0)
    model = VpmoeModel(m)
    CheckpointManager(tmp_path / "ckpt").save(1, model, build_optimizer(model, cfg.train.optimizer),
                                              {}, config_text=dump_config(cfg))
    backend = load_backend(str(tmp_path / "ckpt"))
    prompt = "To be, or not to be"

    async def body(client):
        gen = await _post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0})
        echo = await _post(client, "/v1/completions",
                           {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
        return gen, echo

    ((s1, gen), (s2, echo)), _ = _with_server(backend, body)
    assert s1 == 200 and s2 == 200
    ids = tok.encode(prompt)
    expect = generate(model, [ids], 6, eos_id=tok.eos_token_id)[0]
    assert gen["choices"][0]["text"] == tok.decode([t for t in expect if t != tok.eos_token_id])
    lps = echo["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None
    assert lps[1:] == pytest.approx(sequence_logprobs(model, [ids], [1])[0], abs=1e-5)


def test_cli_errors(tmp_path, tmp_path_factory, shared_data, capsys):
    import socket

    from megatron_vpmoe.cli import main as vpmoe

    assert vpmoe(["serve", str(tmp_path / "missing"), "--port", "8000"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert vpmoe(["serve", str(toy_teacher_dir(tmp_path_factory, shared_data)),
                      "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
