"""`vpmoe serve`: the OpenAI-compatible API on a toy Harmony teacher (in-process aiohttp server)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import json
from pathlib import Path

import pytest
import torch

from megatron_vpmoe.data.chat_format import parse_harmony_completion, render_harmony_prompt
from helpers.paths import ROOT
from helpers.teachers import toy_teacher_dir


@pytest.fixture(scope="module")
def backend(tmp_path_factory, shared_data):
    from megatron_vpmoe.inference.hf import HFBackend

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


def test_harmony_render_and_parse_round_trip(o200k):
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


def test_open_backend_errors(tmp_path):
    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.utils.errors import InputError

    with pytest.raises(InputError, match="no such"):
        open_backend(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not a loadable"):
        open_backend(str(tmp_path / "bad"))


def test_vpmoe_checkpoint_backend(tmp_path, shared_data):
    """A `vpmoe train`-style checkpoint served: greedy generation equals the model's own
    KV-cache generation, echo log-probs equal the teacher-forced per-token loss."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_vpmoe.config import VpmoeConfig, dump_config
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.model.generation import generate
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
    backend = open_backend(str(tmp_path / "ckpt"))
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
    with torch.no_grad():
        nll = model(torch.tensor([ids[:-1]]), labels=torch.tensor([ids[1:]]))[0]
    assert lps[1:] == pytest.approx((-nll).tolist(), abs=1e-5)


def test_cli_errors(tmp_path, tmp_path_factory, shared_data, capsys, o200k):
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


# ---- hardening (issue 20, item 5): bounds, JSON errors for every bad field, cancellation, soak ----

def test_bad_fields_are_json_400_and_oversized_requests_are_refused_before_tokenising(backend):
    """The exact cases of issue 20 (NaN temperature, a 30-digit seed: 500 text/plain; top_p NaN:
    200), more hostile values, and the size limits; every answer is a JSON error body."""
    from megatron_vpmoe.serve.limits import ServeLimits

    limits = ServeLimits(max_request_bytes=200_000, max_prompt_tokens=300, max_request_tokens=2000, max_pending=8)
    raw_cases = [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": NaN}',
                 b'{"prompt": "x", "temperature": Infinity}', b'{"prompt": "x", "top_p": -Infinity}',
                 b'{"prompt": "x", "seed": 123456789012345678901234567890}',
                 b'{"prompt": "x", "max_tokens": 123456789012345678901234567890}',
                 b'{"prompt": "x", "n": 99999999999999999999}', b'{"prompt": "x", "temperature": 1e400}',
                 b'{"prompt": "x", "temperature": 123456789012345678901234567890}',
                 b'{"prompt": "x", "seed": -1}', b'{"prompt": "x", "n": true}', b'{"prompt": [1, true]}',
                 b'{"prompt": [1, 99999999999999999999999]}', b'{"prompt": "x", "stop": ["a", "b", "c", "d", '
                 b'"e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}',
                 b'{"prompt": "x", "n": 8, "max_tokens": 300}', b'{"prompt": ' + json.dumps(list(range(301))).encode()
                 + b'}', b'{"prompt": "x", "seed": 1' + b'0' * 5000 + b'}']
    chat_cases = [b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                  b'{"messages": [{"role": "user", "content": "hi"}], "seed": 123456789012345678901234567890}',
                  b'{"messages": [{"role": "user", "content": "hi"}], "n": 64, "max_tokens": 1000}']
    long_text = "Natalia sold clips " * 3000  # ~57k characters: refused before tokenising
    medium_text = "a b " * 600  # short enough to encode, then over 300 tokens

    async def body(client):
        out = []
        for path, payloads in (("/v1/completions", raw_cases), ("/v1/chat/completions", chat_cases)):
            for data in payloads:
                resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
                out.append((data[:60], resp.status, resp.content_type, await resp.text()))
        for payload in ({"prompt": long_text}, {"prompt": medium_text},
                        {"messages": [{"role": "user", "content": long_text}]}):
            resp = await client.post("/v1/completions" if "prompt" in payload else "/v1/chat/completions",
                                     json=payload)
            out.append((str(payload)[:60], resp.status, resp.content_type, await resp.text()))
        big = await client.post("/v1/completions", data=b'{"prompt": "' + b"x" * 300_000 + b'"}',
                                headers={"Content-Type": "application/json"})
        out.append(("300 kB body", big.status, big.content_type, await big.text()))
        ok = await _post(client, "/v1/completions", {"prompt": "Weng earns", "max_tokens": 4, "temperature": 0,
                                                     "seed": 2**63 - 1})
        real = backend.generate
        backend.generate = lambda *a, **k: 1 / 0  # a bug inside the server: still a JSON answer
        try:
            crash = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            out.append(("crash", crash.status, crash.content_type, await crash.text()))
        finally:
            backend.generate = real
        return out, ok

    (results, ok), server = _with_server(backend, body, limits=limits)
    encoded = len(backend.encode(long_text))
    assert encoded > 300  # so the refusals below are right, not just early
    for what, status, ctype, text in results:
        expect = {"300 kB body": 413, "crash": 500}.get(what, 400)
        assert (status, ctype) == (expect, "application/json"), (what, status, text)
        assert json.loads(text)["error"]["code"] == expect and json.loads(text)["error"]["message"]
    messages = {what: json.loads(text)["error"]["message"] for what, _, _, text in results}
    assert "finite" in messages[b'{"prompt": "x", "temperature": NaN}']
    assert "finite" in messages[b'{"prompt": "x", "top_p": NaN}']
    assert "'seed' must be between 0 and" in messages[b'{"prompt": "x", "seed": 123456789012345678901234567890}']
    assert "characters is over this server's 300 tokens" in messages[str({"prompt": long_text})[:60]]
    assert "tokens is over this server's 300" in messages[str({"prompt": medium_text})[:60]]
    assert "2400 tokens is over this server's 2000" in messages[b'{"prompt": "x", "n": 8, "max_tokens": 300}']
    assert server.rejected["too_large"] == 1 and ok[0] == 200


def test_a_disconnected_client_stops_its_generation(backend):
    """Issue 20: dropped clients' n=64, max_tokens=1000 requests kept generating and the next
    small request waited 38 s. Now the batch stops at the next forward step."""
    from megatron_vpmoe.serve.limits import ServeLimits

    limits = ServeLimits(max_request_tokens=64_000)
    calls = []
    real = backend.model.forward

    async def body(client):
        backend.model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.post("/v1/completions", json={
                    "prompt": "Weng earns", "n": 64, "max_tokens": 1000, "temperature": 1.0}), 0.5)
            started = len(calls)
            t0 = time.perf_counter()
            status, data = await _post(client, "/v1/completions", {"prompt": "Betty", "max_tokens": 4,
                                                                    "temperature": 0})
            return started, time.perf_counter() - t0, status, (await (await client.get("/health")).json())
        finally:
            backend.model.forward = real

    (started, waited, status, health), _ = _with_server(backend, body, limits=limits)
    assert status == 200 and health["cancelled_batches"] == 1
    assert 0 < started < 1000 and len(calls) < started + 30  # stopped, not 1000 steps
    assert waited < 5.0, waited


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_mb(pid: int, key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


IDLE_SAMPLES = 8
# the load: OVERSIZED_CLIENTS each send a 20 MB body and a prompt far over the token limit every
# OVERSIZED_PAUSE_S; one client sends n=64 x max_tokens=1000 and drops it after DROP_AFTER_S,
# every DROP_PAUSE_S (while it is connected, its batch is real work the small requests queue behind)
OVERSIZED_CLIENTS, OVERSIZED_PAUSE_S = 2, 0.3
DROP_AFTER_S, DROP_PAUSE_S = 0.2, 1.0


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _soak(model_dir: Path, seconds: float, load=("oversized", "dropped")) -> dict:
    """``vpmoe serve`` in its own process, loopback only; for ``seconds`` concurrent 20 MB bodies,
    prompts over the token limit, and n=64 x max_tokens=1000 requests dropped by their client
    (rates below), while one client sends small requests one after another. Returns latencies
    (idle and under load), the server's RSS (after start, and its peak) and what it answered."""
    import aiohttp

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_vpmoe.cli", "serve", str(model_dir), "--port", str(port),
                             "--threads", "1", "--max-request-tokens", "64000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    small = {"prompt": "Weng earns", "max_tokens": 16, "temperature": 0}
    out = {"statuses": {}, "errors": []}

    def count(kind, status):
        key = f"{kind}:{status}"
        out["statuses"][key] = out["statuses"].get(key, 0) + 1

    async def main():
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.time() + 120
            while True:
                try:
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
                    await asyncio.sleep(0.2)

            async def small_request():
                t0 = time.perf_counter()
                async with session.post(url + "/v1/completions", json=small) as r:
                    await r.json()
                    count("small", r.status)
                return time.perf_counter() - t0

            for _ in range(3):  # warm up
                await small_request()
            out["idle"] = [await small_request() for _ in range(IDLE_SAMPLES)]
            out["rss_start_mb"] = _proc_mb(proc.pid, "VmRSS")
            cpu_start = _cpu_s(proc.pid)
            stop = time.time() + seconds
            huge = b'{"prompt": "' + b"x" * (20 << 20) + b'"}'
            # ~950 kB: under the byte limit, far over the token limit
            over_tokens = json.dumps({"prompt": "Natalia sold clips " * 50_000}).encode()

            async def oversized():
                while time.time() < stop:
                    try:
                        async with session.post(url + "/v1/completions", data=huge,
                                                headers={"Content-Type": "application/json"}) as r:
                            count("huge", r.status)
                            assert r.content_type == "application/json"
                    except aiohttp.ClientError:  # the server may close while the body is being sent
                        count("huge", "closed")
                    async with session.post(url + "/v1/completions", data=over_tokens,
                                            headers={"Content-Type": "application/json"}) as r:
                        count("over_tokens", r.status)
                    await asyncio.sleep(OVERSIZED_PAUSE_S)

            async def dropped():
                while time.time() < stop:
                    try:
                        await asyncio.wait_for(session.post(url + "/v1/completions", json={
                            "prompt": "Weng earns", "n": 64, "max_tokens": 1000, "temperature": 1.0}), DROP_AFTER_S)
                        count("dropped", "answered")
                    except asyncio.TimeoutError:
                        count("dropped", "cancelled")
                    await asyncio.sleep(DROP_PAUSE_S)

            async def smalls():
                latencies = []
                while time.time() < stop:
                    latencies.append(await small_request())
                return latencies

            jobs = [oversized() for _ in range(OVERSIZED_CLIENTS if "oversized" in load else 0)]
            jobs += [dropped()] if "dropped" in load else []
            out["loaded"] = (await asyncio.gather(smalls(), *jobs))[0]
            out["server_cpu_s"] = _cpu_s(proc.pid) - cpu_start
            out["idle"] += [await small_request() for _ in range(IDLE_SAMPLES)]  # idle again: drift of the host
            out["huge_bytes"] = len(huge)
            async with session.get(url + "/health") as r:
                out["health"] = await r.json()
            out["rss_peak_mb"] = _proc_mb(proc.pid, "VmHWM")
            out["rss_end_mb"] = _proc_mb(proc.pid, "VmRSS")

    try:
        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def _check_soak(out: dict) -> None:
    idle, loaded = _median(out["idle"]), _median(out["loaded"])
    print(f"soak: server CPU {out['server_cpu_s']:.1f} s; idle median {idle * 1e3:.1f} ms, loaded median {loaded * 1e3:.1f} ms "
          f"({loaded / idle:.2f}x, {len(out['loaded'])} requests), RSS start {out['rss_start_mb']:.0f} MB, "
          f"peak {out['rss_peak_mb']:.0f} MB, end {out['rss_end_mb']:.0f} MB, {out['statuses']}, {out['health']}")
    s = out["statuses"]
    assert s.get("huge:413", 0) + s.get("huge:closed", 0) >= 1 and not any(
        k.startswith("huge:") and k not in ("huge:413", "huge:closed") for k in s), s
    assert s.get("huge:413", 0) >= 1  # at least one 413 came back as JSON (the others may be cut)
    assert s.get("over_tokens:400", 0) >= 1 and set(k for k in s if k.startswith("over_tokens")) == {"over_tokens:400"}
    assert s.get("dropped:cancelled", 0) >= 2 and out["health"]["cancelled_batches"] >= 1
    assert s.get("small:200") == 3 + len(out["idle"]) + len(out["loaded"])
    # the bounds: the server's peak RSS stays within 150 MB of what it used after start (a 20 MB
    # prompt took it to 6 GB before), and small requests keep their median latency within 2x of idle
    assert out["rss_peak_mb"] < out["rss_start_mb"] + 150, out
    assert loaded < 2 * idle, (loaded, idle)


def test_soak_with_oversized_and_dropped_requests(tmp_path_factory, shared_data):
    """Reduced soak (4 s of load; ~15 s with the server's start) for CI; the 60 s run is test_soak_long."""
    _check_soak(_soak(toy_teacher_dir(tmp_path_factory, shared_data), 4.0))


@pytest.mark.long
def test_soak_long(tmp_path_factory, shared_data):
    _check_soak(_soak(toy_teacher_dir(tmp_path_factory, shared_data), 60.0))


def test_tokenising_is_off_the_event_loop_and_a_full_server_answers_503(backend):
    """Issue 20: tokenising a 20 MB prompt blocked every request (/v1/models took 3.9 s). A slow
    tokenizer (1 s per prompt here) no longer delays /v1/models; with max_pending=2 in progress, a
    third request gets 503 JSON with Retry-After at once."""
    from megatron_vpmoe.serve.limits import ServeLimits

    real = backend.encode_with_offsets

    def slow(text, **kw):
        time.sleep(1.0)
        return real(text, **kw)

    async def body(client):
        backend.encode_with_offsets = slow
        try:
            busy = [asyncio.ensure_future(_post(client, "/v1/completions", {"prompt": p, "max_tokens": 2}))
                    for p in ("Weng earns", "Betty is")]
            t0 = time.perf_counter()  # client and server share this loop: a blocked loop stalls both
            await asyncio.sleep(0.2)  # the two prompts are being tokenised now
            models = await client.get("/v1/models")
            models_s = time.perf_counter() - t0
            full = await client.post("/v1/completions", json={"prompt": "x"})
            full = (full.status, full.content_type, full.headers.get("Retry-After"), await full.json())
            done = await asyncio.gather(*busy)
            return models.status, models_s, full, done
        finally:
            backend.encode_with_offsets = real

    (status, models_s, full, done), server = _with_server(backend, body, limits=ServeLimits(max_pending=2))
    assert status == 200 and models_s < 0.7, models_s  # 0.2 s of sleep + the request
    assert full[:3] == (503, "application/json", "1") and "server busy" in full[3]["error"]["message"]
    assert [s for s, _ in done] == [200, 200] and server.rejected["busy"] == 1
