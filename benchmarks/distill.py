"""Teacher-generation throughput: requests/s and tokens/s at concurrency 1, 4 and 16.

1. The toy GPT-2 Harmony teacher under `vpmoe serve`, micro-batching on, plus concurrency 16 with
   batching effectively off (``--max-batch 1``) as the peer in the same run.
2. The toy GPT-OSS teacher (``GptOssForCausalLM``, full 201,088-token o200k Harmony vocabulary)
   under `vpmoe serve` and under `transformers serve` (third party; no batching across requests
   without ``--continuous-batching``), same requests, same client.

Servers run as subprocesses on 127.0.0.1 (1 torch thread) and are driven with the async client
`vpmoe distill generate` uses. Writes ``benchmarks/results/distill.json`` and ``.md``.

    python benchmarks/distill.py [--requests 32] [--max-tokens 64] [--gpt-oss-requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


async def _drive(url: str, questions: list, concurrency: int, max_tokens: int) -> dict:
    from megatron_vpmoe.distill.teacher_client import TeacherClient

    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client, q):
        nonlocal tokens
        async with sem:
            data = await client.chat({"messages": [{"role": "user", "content": q}],
                                      "max_tokens": max_tokens, "temperature": 1.0})
            tokens += data["usage"]["completion_tokens"]

    async with TeacherClient(url, concurrency=concurrency, timeout_s=600) as client:
        await one(client, questions[0])  # warm-up
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(one(client, q) for q in questions))
        secs = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(questions), "seconds": round(secs, 3),
            "requests_per_s": round(len(questions) / secs, 3),
            "tokens_per_s": round(tokens / secs, 1), "completion_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--gpt-oss-requests", type=int, default=16, help="requests per level for the GPT-OSS toy")
    ap.add_argument("--gpt-oss-steps", type=int, default=20, help="training steps of the GPT-OSS toy")
    args = ap.parse_args()
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(SHARED / "tokenizers"))
    import torch

    from megatron_vpmoe.distill.toy_teacher import build_toy_teacher
    from megatron_vpmoe.serve.process import ServedModel

    torch.set_num_threads(1)
    gsm8k = SHARED / "data" / "kd" / "gsm8k_train.jsonl"
    questions = [json.loads(l)["question"] for _, l in zip(range(args.requests), gsm8k.open())]
    runs, gpt_oss_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_toy_teacher(str(gsm8k), str(Path(tmp) / "teacher"))
        for max_batch, levels in ((32, (1, 4, 16)), (1, (16,))):
            with ServedModel(teacher, Path(tmp) / "serve.log", ["--max-batch", str(max_batch)]) as server:
                for c in levels:
                    r = asyncio.run(_drive(server.url, questions, c, args.max_tokens))
                    r["server_max_batch"] = max_batch
                    runs.append(r)
                    print(json.dumps(r))
        from megatron_vpmoe.distill.gpt_oss_teacher import build_gpt_oss_teacher

        gpt_oss = build_gpt_oss_teacher(str(gsm8k), str(Path(tmp) / "gpt_oss"), steps=args.gpt_oss_steps)
        for server in ("vpmoe", "transformers"):
            extra = ["--max-batch", "32"] if server == "vpmoe" else []
            with ServedModel(gpt_oss, Path(tmp) / f"{server}.log", extra, server=server) as served:
                for c in (1, 4, 16):
                    r = asyncio.run(_drive(served.url, questions[:args.gpt_oss_requests], c, args.max_tokens))
                    r.update(teacher="gpt-oss", server=server)
                    gpt_oss_runs.append(r)
                    print(json.dumps(r))
    base = runs[0]["tokens_per_s"]
    unbatched = next(r for r in runs if r["server_max_batch"] == 1)
    batched16 = next(r for r in runs if r["server_max_batch"] == 32 and r["concurrency"] == 16)
    result = {
        "benchmark": "distill teacher generation via vpmoe serve (toy 2-layer GPT-2 teacher, CPU)",
        "max_tokens": args.max_tokens, "torch_threads": 1, "runs": runs,
        "speedup_c16_vs_c1": round(batched16["tokens_per_s"] / base, 2),
        "speedup_c16_batched_vs_unbatched": round(batched16["tokens_per_s"] / unbatched["tokens_per_s"], 2),
        "gpt_oss": {"teacher": f"GptOssForCausalLM 2 layers, hidden 64, 4 experts, vocab 201088, "
                               f"{args.gpt_oss_steps} training steps", "runs": gpt_oss_runs},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# distill: teacher generation throughput", "",
             f"Toy Harmony teacher served by `vpmoe serve` on CPU (1 torch thread), {args.requests} "
             f"chat requests of up to {args.max_tokens} tokens, temperature 1.0.", "",
             "| server max batch | concurrency | requests/s | tokens/s |", "|---|---|---|---|"]
    lines += [f"| {r['server_max_batch']} | {r['concurrency']} | {r['requests_per_s']} | {r['tokens_per_s']} |"
              for r in runs]
    lines += ["", f"Concurrency 16 vs 1: {result['speedup_c16_vs_c1']}x tokens/s; micro-batching on vs off "
                  f"at concurrency 16: {result['speedup_c16_batched_vs_unbatched']}x.", ""]
    lines += [f"Toy GPT-OSS teacher ({result['gpt_oss']['teacher']}), {args.gpt_oss_requests} requests of up "
              f"to {args.max_tokens} tokens per level:", "",
              "| server | concurrency | requests/s | tokens/s |", "|---|---|---|---|"]
    lines += [f"| {r['server']} serve | {r['concurrency']} | {r['requests_per_s']} | {r['tokens_per_s']} |"
              for r in gpt_oss_runs]
    lines.append("")
    (RESULTS / "distill.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
