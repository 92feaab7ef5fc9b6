"""``vpmoe eval``: evaluate a checkpoint or HF directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (bits per byte, GSM8K, multiple choice, long context)",
        description="Evaluate a native checkpoint or a Hugging Face model directory. Tasks: bpb, gsm8k, "
                    "mmlu_stem, lambada, piqa, copa, openbookqa, commonsenseqa, winogrande, wsc, "
                    "long_context; groups mc and all. Writes results.json, results.md and PNG plots.",
    )
    parser.add_argument("model", metavar="CKPT_OR_HF", help="native checkpoint dir or Hugging Face model dir")
    parser.add_argument("--tasks", default="bpb,mc", help="comma-separated tasks (default: bpb,mc)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="items per task (default: all)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output dir (default: CKPT_OR_HF/eval)")
    parser.add_argument("--eval-dir", default=None, metavar="DIR", help="eval data (default: eval/ of $VPMOE_DATA, ../shared/data or the embedded default)")
    parser.add_argument("--bpb-text", default=None, metavar="PATH",
                        help="text for bpb: .txt, dir of .txt, or .jsonl with 'text' (default: LAMBADA passages)")
    parser.add_argument("--long-text", default=None, metavar="PATH", help="text for long_context (default: LAMBADA)")
    parser.add_argument("--context", type=int, default=None,
                        help="training context for long_context (read to 4x; default: the model's)")
    parser.add_argument("--shots", type=int, default=5, help="GSM8K few-shot examples (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="longest input (default: the model's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core; on a busy shared CPU "
                             "--threads 1 avoids stalls, see docs/eval.md)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a Hugging Face directory run the Python code it ships (auto_map); only for "
                             "directories from a trusted source (VPMoE directories from 'vpmoe convert to-hf' "
                             "load without it, with this package's model code)")
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.eval.harness import EvalOptions, run_eval
    from megatron_vpmoe.eval.report import markdown_table, write_results
    from megatron_vpmoe.eval.tasks import DEFAULT_EVAL_DIR, resolve_tasks
    from megatron_vpmoe.utils.errors import UsageError

    tasks = resolve_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    backend = open_backend(args.model, batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                           trust_remote_code=args.trust_remote_code)
    options = EvalOptions(
        tasks=tasks, limit=args.limit, eval_dir=Path(args.eval_dir) if args.eval_dir else DEFAULT_EVAL_DIR,
        bpb_text=Path(args.bpb_text) if args.bpb_text else None,
        long_text=Path(args.long_text) if args.long_text else None, context=args.context,
        gsm8k_shots=args.shots, max_new_tokens=args.max_new_tokens,
    )
    results = run_eval(backend, options, model_name=args.model)
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    written = write_results(results, out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

