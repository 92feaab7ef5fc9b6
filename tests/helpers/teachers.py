"""Teachers for the serve and distillation tests: the toy Harmony teacher, `vpmoe serve` as a
subprocess, a scripted OpenAI-style server, and the student tokenizer the e2e runs train."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from helpers.distributed import free_port
from helpers.needs import need_o200k


def toy_teacher_dir(tmp_path_factory, shared_data: Path) -> Path:
    """Build the toy Harmony teacher once per test session (the serve and distillation tests
    share it); its Harmony rendering needs the o200k ranks (skips without them)."""
    from megatron_vpmoe.distill.toy_teacher import build_toy_teacher

    need_o200k()
    path = tmp_path_factory.getbasetemp() / "toy_teacher"
    if not (path / "config.json").is_file():
        torch.set_num_threads(1)
        build_toy_teacher(str(shared_data / "kd" / "gsm8k_train.jsonl"), str(path))
    return path


PY = [sys.executable, "-m", "megatron_vpmoe.cli"]  # `vpmoe` in a subprocess


def cli_env() -> dict:
    """The environment of CLI subprocesses: one thread, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class ServedTeacher:
    """`vpmoe serve DIR` as a subprocess on 127.0.0.1."""

    def __init__(self, model_dir: Path, port: int, log: Path):
        self.model_dir, self.port, self.log = model_dir, port, log

    def command(self) -> list:
        return PY + ["serve", str(self.model_dir), "--port", str(self.port), "--threads", "1"]

    def start(self) -> "ServedTeacher":
        self.proc = subprocess.Popen(self.command(), stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=cli_env())
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def generated_records(out: Path) -> list:
    """Every record `vpmoe distill generate` wrote under ``out``, accepted and rejected."""
    return [json.loads(line) for kind in ("shard", "rejected")
            for p in sorted(out.glob(f"{kind}-*.jsonl")) for line in p.open()]


def student_tokenizer(path: Path, shared_data: Path) -> int:
    """A student BPE from `vpmoe tokenizer train` on Shakespeare (Harmony specials included):
    shares nothing with the teacher's tokenizer. Returns its vocabulary size."""
    from megatron_vpmoe.cli import main as vpmoe
    from megatron_vpmoe.tokenizers import load

    if not (path / "tokenizer.json").is_file():
        assert vpmoe(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "400", "--input",
                      str(shared_data / "corpora" / "tinyshakespeare.txt"), "--max-bytes", "100000",
                      "--output", str(path)]) == 0
    return len(load(path).to_hf())


class ScriptedTeacher:
    """An OpenAI-style server (real HTTP on 127.0.0.1, aiohttp in a thread) whose chat and
    completion answers come from ``self.answer(body, call_no) -> (status, payload[, delay_s])``;
    ``payload`` may also be an async ``handler(request, stop_event)`` that answers at the HTTP
    level (see :func:`hostile_answer`). The capability probe's chat request and ``/v1/models`` are
    answered apart (n choices), uncounted, unless ``probe=False``: then they get ``answer`` too."""

    def __init__(self, answer, port=None, probe=True):
        self.answer = answer
        self.probe = probe
        self.calls = 0
        self.port = port or free_port()
        self._ready = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def _serve(self):
        from aiohttp import web

        async def models(request):
            if not self.probe:
                return await scripted(request, {})
            return web.json_response({"data": [{"id": "scripted"}]})

        async def chat(request):  # also /v1/completions; (status, payload[, delay_s])
            from megatron_vpmoe.distill.teacher_probe import PROBE_CHAT

            body = await request.json()
            if self.probe and body.get("messages") and body["messages"][-1]["content"] == PROBE_CHAT:
                return web.json_response(scripted_choices(body))  # the capability probe: chat with n served
            return await scripted(request, body)

        async def scripted(request, body):
            self.calls += 1
            status, payload, *delay = self.answer(body, self.calls)
            if delay:
                await asyncio.sleep(delay[0])
            if callable(payload):
                return await payload(request, self._stop)
            if isinstance(payload, str):
                return web.Response(status=status, text=payload)
            return web.json_response(payload, status=status)

        async def main():
            app = web.Application()
            app.router.add_get("/v1/models", models)
            app.router.add_post("/v1/chat/completions", chat)
            app.router.add_post("/v1/completions", chat)
            runner = web.AppRunner(app, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


HOSTILE_MODES = ("slow", "never", "huge", "huge_chunked", "nested", "garbage", "schema", "500", "429",
                 "disconnect")


def hostile_answer(mode: str):
    """An answer function for :class:`ScriptedTeacher` that misbehaves as ``mode`` says:

    * ``slow`` - headers, then one byte every 0.2 s, forever (no read ever times out; only the
      whole request's deadline ends it);
    * ``never`` - accepts the request and never answers;
    * ``huge`` - announces ``Content-Length`` 3 GiB and streams spaces; ``huge_chunked`` streams
      spaces without a length;
    * ``nested`` - ``"[" * 200000 + "]" * 200000`` (JSON nested 200000 deep);
    * ``garbage`` - 200 with bytes that are not JSON (nor UTF-8);
    * ``schema`` - 200 with JSON of the wrong shape;
    * ``500`` / ``429`` - that status, every time;
    * ``disconnect`` - headers announcing 1000 bytes, 10 of them, then the connection closes.
    """
    from aiohttp import web

    async def stream(request, stop, length=None, every=0.0, chunk=b" " * 65536):
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        try:
            while not stop.is_set():
                await resp.write(chunk)
                if every:
                    try:
                        await asyncio.wait_for(stop.wait(), every)
                    except asyncio.TimeoutError:
                        pass
        except (ConnectionError, RuntimeError):  # the client hung up: what it should do
            pass
        return resp

    async def never(request, stop):
        await stop.wait()
        return web.Response(status=503)

    async def disconnect(request, stop):
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"choices"')
        request.transport.close()
        return resp

    payloads = {
        "slow": (200, lambda r, s: stream(r, s, every=0.2, chunk=b" ")),
        "never": (200, never),
        "huge": (200, lambda r, s: stream(r, s, length=3 << 30)),
        "huge_chunked": (200, lambda r, s: stream(r, s)),
        "nested": (200, "[" * 200000 + "]" * 200000),
        "garbage": (200, lambda r, s: _raw(bytes(range(256)) * 4)),
        "schema": (200, {"choices": "none", "data": 5}),
        "500": (500, "internal error"),
        "429": (429, "slow down"),
        "disconnect": (200, disconnect),
    }
    status, payload = payloads[mode]
    return lambda body, call: (status, payload)


async def _raw(data: bytes):
    from aiohttp import web

    return web.Response(status=200, body=data, content_type="application/json")


def scripted_choices(body, final="The answer is 5.", reasoning="2+3=5"):
    return {"model": "scripted", "usage": {"completion_tokens": 10 * body["n"]}, "choices": [
        {"index": i, "finish_reason": "stop",
         "message": {"role": "assistant", "content": final, "reasoning_content": f"{reasoning} #{i}"}}
        for i in range(body["n"])]}


def onpolicy_config(work, vocab, port, prompts, steps, scorers="[{kind: loglik, weight: 1.0}]",
                    teacher_tokenizer=None):
    """A small on-policy distillation config under ``work`` (student tokenizer at ``work/student_tok``,
    a teacher on ``port``; ``teacher_tokenizer``: its tokenizer directory, default o200k Harmony),
    written to ``work/onpolicy.yaml``."""
    text = f"""
run: {{dir: {work}/run, seed: 1}}
model: {{vocab_size: {vocab}, hidden_size: 64, num_layers: 2, num_attention_heads: 4,
  num_query_groups: 2, kv_channels: 16, ffn_hidden_size: 128, window_size: 16, moe_first_k_dense: 1,
  num_moe_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 64,
  moe_shared_expert_intermediate_size: 64, moe_router_num_groups: 1, moe_router_group_topk: 1}}
data: {{tokenizer: {work}/student_tok, mock: true, seq_length: 64}}
train: {{steps: {steps}, global_batch_size: 8, micro_batch_size: 8,
  optimizer: {{lr: 0.003, min_lr: 0.003}}, schedule: {{kind: constant}}}}
checkpoint: {{dir: {work}/run/ckpt, keep_last: 1}}
log: {{progress_bar: false}}
distill:
  teacher_url: http://127.0.0.1:{port}
  onpolicy: {{prompts: [{prompts}], samples_per_prompt: 4, prompts_per_step: 2, max_new_tokens: 16,
    kl_coeff: 0.05, sample_table_interval: 10, teacher_timeout_s: 30, teacher_retries: 1,
    scorers: {scorers}{f", teacher_tokenizer: {teacher_tokenizer}" if teacher_tokenizer else ""}}}
"""
    path = work / "onpolicy.yaml"
    path.write_text(text)
    return path
