"""``vpmoe serve CKPT_OR_HF_DIR --port P``: a model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint behind an OpenAI-compatible HTTP API",
        description="Serve a VPMoE checkpoint or a Hugging Face causal-LM directory with "
                    "/v1/models, /v1/completions (logprobs, echo) and /v1/chat/completions "
                    "(Harmony or the tokenizer's chat template). Concurrent requests are batched.",
        epilog="example: vpmoe serve runs/teacher/hf --port 8000 "
               "&& curl localhost:8000/v1/completions -d '{\"prompt\": \"Hi\", \"max_tokens\": 8}'")
    parser.add_argument("model", metavar="CKPT_OR_HF_DIR",
                        help="a Hugging Face model directory (config.json) or a vpmoe checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer of a vpmoe checkpoint (default: data.tokenizer of its config)")
    parser.add_argument("--served-model-name", default=None, help="model id (default: a checkpoint's run.name, else its run directory's name; an HF directory's name)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long to gather concurrent requests into one batch")
    parser.add_argument("--max-batch", type=int, default=32, help="most sequences per forward call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    limits = parser.add_argument_group("bounds (docs/distill.md)")
    defaults = _limit_defaults()
    limits.add_argument("--max-request-bytes", type=int, default=defaults["max_request_bytes"], metavar="N",
                        help="largest request body; a larger one gets 413 before it is read (default 1 MiB)")
    limits.add_argument("--max-prompt-tokens", type=int, default=defaults["max_prompt_tokens"], metavar="N",
                        help="longest prompt in tokens; longer gets 400, before tokenising when its "
                             "length proves it (default %(default)s)")
    limits.add_argument("--max-request-tokens", type=int, default=defaults["max_request_tokens"], metavar="N",
                        help="most tokens one request may ask to generate: prompts x n x max_tokens "
                             "(default %(default)s)")
    limits.add_argument("--max-pending", type=int, default=defaults["max_pending"], metavar="N",
                        help="requests in progress at once (reading, tokenising, queued, generating); more "
                             "get 503 with Retry-After (default %(default)s)")
    parser.set_defaults(func=_run)


def _limit_defaults() -> dict:
    from dataclasses import fields

    from megatron_vpmoe.serve.limits import ServeLimits  # no aiohttp: every vpmoe command builds this parser

    return {f.name: f.default for f in fields(ServeLimits)}


def _run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from megatron_vpmoe.serve.app import OpenAIServer
    from megatron_vpmoe.serve.limits import ServeLimits
    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.utils.errors import UsageError, VpmoeError

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_batch < 1:
        raise UsageError("--max-batch must be >= 1")
    limits = ServeLimits(args.max_request_bytes, args.max_prompt_tokens, args.max_request_tokens, args.max_pending)
    try:
        limits.check()
    except ValueError as err:
        raise UsageError(f"--{str(err).replace('_', '-')}") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    backend = open_backend(args.model, model_id=args.served_model_name, tokenizer=args.tokenizer,
                           batch_size=args.max_batch)
    server = OpenAIServer(backend, window_ms=args.batch_window_ms, max_batch=args.max_batch, limits=limits)
    print(f"vpmoe serve: {backend.model_id} ({'Harmony' if backend.is_harmony else 'plain'} chat) "
          f"on http://{args.host}:{args.port}/v1", flush=True)
    try:
        # handler_cancellation: a client that disconnects cancels its request (and its generation)
        web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None,
                    handler_cancellation=True)
    except OSError as err:  # port taken, address not available
        raise VpmoeError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    return 0
