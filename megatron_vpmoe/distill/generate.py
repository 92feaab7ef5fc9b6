"""Teacher generation (``vpmoe distill generate``): prompts -> teacher samples -> jsonl shards.

Output directory layout (every file is written whole under a temporary name, then renamed):

* ``shard-NNNNN.jsonl`` - accepted samples, one JSON object per line: ``prompt_id``,
  ``sample_index``, ``source`` (file:line), ``messages`` (the prompt), ``reference``,
  ``teacher_model``, ``sampling``, ``reasoning`` (analysis channel, or null), ``final``,
  ``finish_reason``;
* ``rejected-NNNNN.jsonl`` - the same for samples a filter rejected, plus ``rejected`` (reason);
* ``summary.json`` - the counts of the latest run;
* ``teacher.json`` - the teacher (base URL and model) the samples come from: a re-run against
  another URL or model is refused rather than mixing two teachers' samples in one directory
  (``--teacher-moved``: the same model now answers at another URL).

Every (prompt id, sample index) ends up in exactly one of the two kinds of shard. A re-run reads
them and asks the teacher only for the missing pairs, so an interrupted run (teacher died,
Ctrl-C, SIGTERM) resumes without duplicating or dropping anything. Samples not yet flushed when a
process is killed are simply generated again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.answers import answer_matches
from megatron_vpmoe.distill.prompts import Prompt, load_prompts
from megatron_vpmoe.distill.teacher_client import (MAX_RESPONSE_BYTES, MalformedResponse, TeacherClient,
                                                   TeacherUnavailable, check_client_options, check_teacher_url)
from megatron_vpmoe.utils.atomic import atomic_file, atomic_write_text
from megatron_vpmoe.utils.errors import InputError, VpmoeError


@dataclass
class GenerateOptions:
    teacher_url: str
    prompt_files: list
    out_dir: str
    model: Optional[str] = None  # teacher model id; default: the server's first model
    samples: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: Optional[int] = None
    endpoint: str = "chat"  # chat | completions
    concurrency: int = 8
    retries: int = 4
    timeout_s: float = 120.0
    backoff_s: float = 0.5
    max_response_bytes: int = MAX_RESPONSE_BYTES
    teacher_moved: bool = False  # the recorded teacher model now answers at another URL
    limit: Optional[int] = None  # prompts per file
    min_chars: int = 1
    max_chars: Optional[int] = None
    keep_truncated: bool = False
    check_answers: bool = True
    dedupe: bool = True
    shard_size: int = 256
    progress: bool = True


@dataclass
class GenerateSummary:
    prompts: int = 0
    requested: int = 0  # samples asked for in this run
    already_done: int = 0  # samples found from earlier runs
    accepted: int = 0
    rejected: dict = field(default_factory=dict)  # reason -> count
    malformed: int = 0
    retried: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: Optional[str] = None  # why the run stopped early, if it did
    malformed_reason: Optional[str] = None  # the first malformed or refused answer, as the teacher said it

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


class ShardStore:
    """The output directory: what is done, and buffered atomic shard writes."""

    def __init__(self, out_dir: str, shard_size: int):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.done: set = set()
        self.hashes: set = set()
        self.models: set = set()  # teacher_model of the records already there
        self.buffers = {"shard": [], "rejected": []}
        self.next_index = {"shard": 0, "rejected": 0}
        for kind in self.buffers:
            for path in sorted(self.dir.glob(f"{kind}-*.jsonl")):
                self.next_index[kind] = max(self.next_index[kind], int(path.stem.split("-")[1]) + 1)
                with open(path, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        try:
                            rec = json.loads(line)
                            key = (rec["prompt_id"], int(rec["sample_index"]))
                        except (ValueError, KeyError, TypeError) as err:
                            raise InputError(f"{path}:{lineno}: not a generation record ({err})") from err
                        if key in self.done:
                            raise InputError(f"{path}:{lineno}: duplicate sample {key}")
                        self.done.add(key)
                        self.models.add(rec.get("teacher_model"))
                        if kind == "shard":
                            self.hashes.add(content_hash(rec))

    def add(self, kind: str, record: dict) -> None:
        self.done.add((record["prompt_id"], record["sample_index"]))
        self.buffers[kind].append(record)
        if len(self.buffers[kind]) >= self.shard_size:
            self.flush(kind)

    def flush(self, kind: Optional[str] = None) -> None:
        for k in [kind] if kind else list(self.buffers):
            if not self.buffers[k]:
                continue
            path = self.dir / f"{k}-{self.next_index[k]:05d}.jsonl"
            with atomic_file(path, "w", encoding="utf-8") as f:
                for rec in self.buffers[k]:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.next_index[k] += 1
            self.buffers[k] = []


def content_hash(rec: dict) -> str:
    text = json.dumps([rec["prompt_id"], rec.get("reasoning"), rec.get("final")], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def rejection_reason(rec: dict, prompt: Prompt, opts: GenerateOptions, hashes: set) -> Optional[str]:
    """Why a sample is rejected, or None to keep it. Filters run in this order."""
    if rec["finish_reason"] == "length" and not opts.keep_truncated:
        return "truncated"
    size = len(rec.get("reasoning") or "") + len(rec["final"])
    if not rec["final"].strip() or size < opts.min_chars:
        return "too_short"
    if opts.max_chars is not None and size > opts.max_chars:
        return "too_long"
    if opts.check_answers and prompt.reference is not None and not answer_matches(
            rec["final"], prompt.reference):
        return "wrong_answer"
    if opts.dedupe and content_hash(rec) in hashes:
        return "duplicate"
    return None


class _Generator:
    def __init__(self, opts: GenerateOptions, prompts: list, store: ShardStore):
        self.opts = opts
        self.prompts = prompts
        self.store = store
        self.summary = GenerateSummary(prompts=len(prompts))
        self.rejected: Counter = Counter()
        self.stop_reason: Optional[str] = None
        self.model = opts.model
        self.bar = None

    def sampling(self, seed: Optional[int]) -> dict:
        o = self.opts
        return {"temperature": o.temperature, "top_p": o.top_p, "max_tokens": o.max_tokens, "seed": seed}

    def _request(self, prompt: Prompt, n: int, seed: Optional[int]) -> dict:
        body = {"model": self.model, "n": n, **self.sampling(seed)}
        if seed is None:
            body.pop("seed")
        if self.opts.endpoint == "chat":
            body["messages"] = prompt.messages
        else:
            body["prompt"] = "\n\n".join(m["content"] for m in prompt.messages)
        return body

    def _records(self, prompt: Prompt, indices: list, data: dict, seed) -> list:
        records = []
        for idx, choice in zip(indices, data["choices"]):
            if self.opts.endpoint == "chat":
                msg = choice["message"]
                final, reasoning = msg.get("content"), msg.get("reasoning_content") or msg.get("reasoning")
            else:
                final, reasoning = choice.get("text"), None
            if not isinstance(final, str) or not (reasoning is None or isinstance(reasoning, str)):
                raise MalformedResponse(f"choice without text content: {json.dumps(choice)[:200]}")
            records.append({
                "prompt_id": prompt.id, "sample_index": idx, "source": prompt.source,
                "messages": prompt.messages, "reference": prompt.reference,
                "teacher_model": data.get("model") or self.model, "sampling": self.sampling(seed),
                "reasoning": reasoning, "final": final,
                "finish_reason": choice.get("finish_reason"),
            })
        if len(records) != len(indices):
            raise MalformedResponse(f"asked for {len(indices)} choices, got {len(data['choices'])}")
        return records

    async def one_prompt(self, client: TeacherClient, sem: asyncio.Semaphore, prompt: Prompt,
                         indices: list) -> None:
        async with sem:
            if self.stop_reason:
                return
            seed = None if self.opts.seed is None else _seed(self.opts.seed, prompt.id, indices[0])
            call = client.chat if self.opts.endpoint == "chat" else client.completions
            try:
                data = await call(self._request(prompt, len(indices), seed))
                records = self._records(prompt, indices, data, seed)
            except MalformedResponse as err:
                self.summary.malformed += 1
                self.summary.malformed_reason = self.summary.malformed_reason or str(err).splitlines()[0][:300]
                return
            except TeacherUnavailable as err:
                self.stop_reason = self.stop_reason or str(err)
                return
            usage = data.get("usage") or {}
            if isinstance(usage.get("completion_tokens"), int):
                self.summary.completion_tokens += usage["completion_tokens"]
            for rec in records:
                reason = rejection_reason(rec, prompt, self.opts, self.store.hashes)
                if reason:
                    self.rejected[reason] += 1
                    self.store.add("rejected", {**rec, "rejected": reason})
                else:
                    self.summary.accepted += 1
                    self.store.hashes.add(content_hash(rec))
                    self.store.add("shard", rec)
            if self.bar is not None:
                self.bar.update(len(records))
                self.bar.set_postfix(ok=self.summary.accepted, rej=sum(self.rejected.values()))

    async def run(self) -> GenerateSummary:
        o = self.opts
        todo = []
        for p in self.prompts:
            missing = [i for i in range(o.samples) if (p.id, i) not in self.store.done]
            self.summary.already_done += o.samples - len(missing)
            if missing:
                todo.append((p, missing))
        self.summary.requested = sum(len(m) for _, m in todo)
        start = time.perf_counter()
        async with TeacherClient(o.teacher_url, timeout_s=o.timeout_s, retries=o.retries,
                                 backoff_s=o.backoff_s, concurrency=o.concurrency,
                                 max_response_bytes=o.max_response_bytes) as client:
            same_teacher(self.store, client.base_url, None, o.teacher_moved)
            from megatron_vpmoe.distill.teacher_probe import TeacherCapabilityError, probe

            # one request: n (which proves chat too) when several samples share a prompt
            features = ([] if o.endpoint != "chat" else ["n"] if o.samples > 1 else ["chat"])
            try:
                caps = await probe(client, features, self.model)
            except TeacherCapabilityError as err:
                raise VpmoeError(str(err)) from None
            self.model = caps.model
            same_teacher(self.store, client.base_url, self.model, o.teacher_moved)
            print(caps.line(), file=sys.stderr, flush=True)
            if o.endpoint == "chat" and not caps.features.get("chat"):
                raise TeacherCapabilityError(f"teacher at {o.teacher_url} does not serve chat: "
                                             f"{caps.why.get('chat') or caps.why.get('n')}")
            if o.endpoint == "chat" and not caps.features.get("n"):
                todo = [(p, [i]) for p, m in todo for i in m]  # one request per sample
            if not todo:
                return self._finish(start, client)
            from megatron_vpmoe.utils.progress import terminal_bar

            self.bar = terminal_bar(total=self.summary.requested, desc="teacher samples", unit="sample",
                                    disable=None if o.progress else True)
            sem = asyncio.Semaphore(o.concurrency)
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGTERM, self._on_signal)
            except (NotImplementedError, RuntimeError):
                pass
            try:
                await asyncio.gather(*(self.one_prompt(client, sem, p, m) for p, m in todo))
            finally:
                self.bar.close()
                self.store.flush()
                try:
                    loop.remove_signal_handler(signal.SIGTERM)
                except (NotImplementedError, RuntimeError):
                    pass
            return self._finish(start, client)

    def _on_signal(self) -> None:
        self.stop_reason = "stopped by SIGTERM"

    def _finish(self, start: float, client: TeacherClient) -> GenerateSummary:
        s = self.summary
        s.seconds = time.perf_counter() - start
        s.rejected = dict(self.rejected)
        s.retried = client.retried
        s.stopped = self.stop_reason
        return s


def _seed(base: int, prompt_id: str, index: int) -> int:
    digest = hashlib.sha1(f"{base}:{prompt_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


TEACHER_FILE = "teacher.json"


def same_teacher(store: ShardStore, base_url: str, model: Optional[str], moved: bool = False) -> None:
    """Refuse (exit 2) to add samples of another teacher (URL, unless ``moved``, or model) to
    ``store``'s directory; record the teacher once its model is known (``model`` not None)."""
    path = store.dir / TEACHER_FILE
    recorded = None
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            recorded = {"url": str(recorded["url"]), "model": recorded.get("model")}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not a teacher record ({err}); remove it to adopt this teacher") from None
    if recorded is not None and recorded["url"] != base_url and not moved:
        raise InputError(f"{store.dir} holds samples of teacher {recorded['url']}, not {base_url}: use another "
                         f"--out so two teachers' samples are not mixed (--teacher-moved if the same "
                         f"model now answers at {base_url})")
    if model is None:
        return
    earlier = {m for m in store.models if m is not None} | ({recorded["model"]} if recorded and recorded["model"] else set())
    if earlier - {model}:
        raise InputError(f"{store.dir} holds samples of teacher model {', '.join(sorted(earlier))}, not {model}: "
                         f"use another --out (or --model) so two teachers' samples are not mixed")
    if recorded != {"url": base_url, "model": model}:
        atomic_write_text(path, json.dumps({"url": base_url, "model": model}, indent=1) + "\n")


def check_options(opts: GenerateOptions) -> None:
    """One :class:`InputError` naming the first flag out of range."""
    def finite(name, value, lo, hi=math.inf, lo_open=False):
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > lo if lo_open else value >= lo) \
            and value <= hi
        if not ok:
            low = f"> {lo}" if lo_open else f">= {lo}"
            raise InputError(f"{name} must be a finite number {low}{f' and <= {hi}' if hi != math.inf else ''}, "
                             f"got {value!r}")

    check_teacher_url(opts.teacher_url, "--teacher")
    for name, value, lo in (("--samples", opts.samples, 1), ("--concurrency", opts.concurrency, 1),
                            ("--shard-size", opts.shard_size, 1), ("--max-tokens", opts.max_tokens, 1),
                            ("--limit", opts.limit, 1), ("--min-chars", opts.min_chars, 0),
                            ("--max-chars", opts.max_chars, 1)):
        if value is not None and value < lo:
            raise InputError(f"{name} must be >= {lo}, got {value}")
    if opts.endpoint not in ("chat", "completions"):
        raise InputError(f"--endpoint must be chat or completions, got {opts.endpoint!r}")
    finite("--temperature", opts.temperature, 0.0)
    finite("--top-p", opts.top_p, 0.0, 1.0, lo_open=True)
    check_client_options(timeout_s=opts.timeout_s, retries=opts.retries, max_response_bytes=opts.max_response_bytes,
                         names={"timeout_s": "--timeout", "retries": "--retries",
                                "max_response_bytes": "--max-response-bytes"})


def run_generate(opts: GenerateOptions) -> GenerateSummary:
    """Generate what is missing in ``opts.out_dir``; raises if the teacher stopped the run or
    refused every request."""
    check_options(opts)
    prompts = load_prompts(opts.prompt_files, opts.limit)
    store = ShardStore(opts.out_dir, opts.shard_size)
    gen = _Generator(opts, prompts, store)
    summary = asyncio.run(gen.run())
    data = asdict(summary)
    data.update(tokens_per_s=summary.tokens_per_s, total_done=len(store.done),
                total_expected=len(prompts) * opts.samples, teacher_model=gen.model)
    atomic_write_text(Path(opts.out_dir) / "summary.json", json.dumps(data, indent=1) + "\n")
    if summary.stopped:
        raise VpmoeError(
            f"{summary.stopped}; {len(store.done)} of {len(prompts) * opts.samples} samples are saved "
            f"in {opts.out_dir}; re-run the same command to resume")
    if summary.malformed and not summary.accepted and not summary.rejected:
        raise VpmoeError(f"the teacher answered none of the {summary.malformed} requests with a usable "
                         f"completion; the first answer: {summary.malformed_reason}")
    return summary


def format_summary(s: GenerateSummary, out_dir: str) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(s.rejected.items())) or "none"
    return (f"{s.prompts} prompts: {s.accepted} accepted, {sum(s.rejected.values())} rejected "
            f"({rejected}), {s.malformed} malformed responses, {s.retried} retries, "
            f"{s.already_done} done before; {s.completion_tokens} teacher tokens in "
            f"{s.seconds:.1f}s ({s.tokens_per_s:.1f} tokens/s) -> {out_dir}")
