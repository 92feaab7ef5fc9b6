"""``vpmoe distill``: teacher-generated corpora (generate, build-corpus), a toy teacher, on-policy."""

from __future__ import annotations

import argparse

from megatron_vpmoe.utils.cli_args import add_config_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill", help="teacher-generated corpora and on-policy distillation",
        description="Distillation from a served teacher: generate samples and assemble the "
                    "phase-1 training corpus, run on-policy (GRPO-style) distillation, build a "
                    "toy teacher for CPU runs.")
    sub = parser.add_subparsers(dest="distill_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    gen = sub.add_parser(
        "generate", help="sample teacher completions for prompt files into jsonl shards",
        description="Send prompts to an OpenAI-compatible teacher and write accepted/rejected "
                    "samples as jsonl shards. Re-running the same command resumes.",
        epilog="example: vpmoe distill generate --teacher http://127.0.0.1:8000 "
               "--prompts ../shared/data/kd/gsm8k_train.jsonl --limit 100 --samples 2 --out runs/kd/gen")
    gen.add_argument("--teacher", required=True, metavar="URL", help="teacher base URL (…/v1 optional)")
    gen.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                     help="jsonl with 'messages', 'prompt' or 'question' (+ 'answer') per line")
    gen.add_argument("--out", required=True, metavar="DIR")
    gen.add_argument("--model", default=None, help="teacher model id (default: the server's first)")
    gen.add_argument("--samples", "-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=1024, help="teacher tokens per sample")
    gen.add_argument("--seed", type=int, default=None, help="per-sample seeds derived from this")
    gen.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    gen.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    gen.add_argument("--retries", type=int, default=4, help="retries per request (exponential backoff)")
    gen.add_argument("--timeout", type=float, default=120.0,
                     help="seconds (> 0) to connect, between reads, and for a whole request")
    gen.add_argument("--max-response-bytes", type=int, default=16 << 20, metavar="N",
                     help="refuse a teacher answer larger than N bytes (default 16 MiB)")
    gen.add_argument("--teacher-moved", action="store_true",
                     help="resume although --out recorded another teacher URL: the same model moved "
                          "(a different model is still refused)")
    gen.add_argument("--limit", type=int, default=None, help="first N prompts of each file")
    gen.add_argument("--min-chars", type=int, default=1, help="reject shorter samples")
    gen.add_argument("--max-chars", type=int, default=None, help="reject longer samples")
    gen.add_argument("--keep-truncated", action="store_true", help="keep samples cut by --max-tokens")
    gen.add_argument("--no-answer-check", action="store_true",
                     help="keep samples whose answer differs from the prompt's reference")
    gen.add_argument("--no-dedupe", action="store_true", help="keep identical samples")
    gen.add_argument("--shard-size", type=int, default=256, help="records per output shard")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=_generate)

    corpus = sub.add_parser(
        "build-corpus", help="teacher samples -> chat records -> student shards -> data blend",
        description="Assemble the phase-1 corpus: the accepted samples of one or more 'distill "
                    "generate' directories become chat records (assistant reasoning + final), "
                    "'vpmoe preprocess' turns them into shards with assistant-only loss masks for "
                    "every student tokenizer, and a config snippet blends them with a mid-training corpus.",
        epilog="example: vpmoe distill build-corpus --generated runs/kd/gen --tokenizer "
               "runs/tok/bpe-32k runs/tok/bpe-64k --mid-training 0.3:runs/shards/web "
               "--distill-weight 0.7 --out runs/kd/corpus")
    corpus.add_argument("--generated", nargs="+", required=True, metavar="DIR",
                        help="output directories of 'vpmoe distill generate'")
    corpus.add_argument("--out", required=True, metavar="DIR")
    corpus.add_argument("--tokenizer", nargs="*", default=[], metavar="DIR",
                        help="student tokenizer directories (one shard set per variant)")
    corpus.add_argument("--distill-weight", type=float, default=1.0, help="blend weight of the KD shards")
    corpus.add_argument("--mid-training", action="append", default=[], metavar="WEIGHT:PREFIX",
                        help="a plain-text shard prefix blended in at WEIGHT (repeatable; '{variant}' in "
                             "PREFIX becomes each tokenizer's variant name)")
    corpus.add_argument("--reasoning-weight", type=float, default=1.0,
                        help="distill.reasoning_loss_weight written to the snippet")
    corpus.add_argument("--final-weight", type=float, default=1.0,
                        help="distill.final_loss_weight written to the snippet")
    corpus.add_argument("--records-only", action="store_true",
                        help="write the chat records and snippet but do not run 'vpmoe preprocess'")
    corpus.set_defaults(func=_build_corpus)

    onp = sub.add_parser(
        "onpolicy", help="on-policy distillation: student samples, teacher scores strings, GRPO update",
        description="GRPO-style on-policy distillation with string-level teacher scoring "
                    "(distill.onpolicy.* in the config; teacher at distill.teacher_url).",
        epilog="example: vpmoe distill onpolicy --config examples/configs/distill-onpolicy.yaml "
               "--set distill.teacher_url=http://127.0.0.1:8000")
    add_config_args(onp)
    onp.set_defaults(func=_onpolicy)

    toy = sub.add_parser(
        "toy-teacher", help="train a tiny Harmony teacher (HF format) on GSM8K for CPU runs",
        description="Train a tiny Harmony teacher on Harmony-rendered GSM8K solutions and save it as a "
                    "Hugging Face directory: --arch gpt2 (a GPT-2 with its own small BPE, the fastest) or "
                    "--arch gpt-oss (transformers' GptOssForCausalLM with the real o200k Harmony tokenizer, "
                    "201,088 tokens, and a Harmony chat template). Serve it with 'vpmoe serve' or "
                    "'transformers serve'.")
    toy.add_argument("--arch", choices=["gpt2", "gpt-oss"], default="gpt2")
    toy.add_argument("--gsm8k", default=None, metavar="FILE",
                     help="GSM8K jsonl (default: kd/gsm8k_train.jsonl of $VPMOE_DATA, ../shared/data or the embedded default)")
    toy.add_argument("--out", required=True, metavar="DIR")
    toy.add_argument("--examples", type=int, default=4)
    toy.add_argument("--steps", type=int, default=None, help="training steps (default: 80 gpt2, 100 gpt-oss)")
    toy.add_argument("--overwrite", action="store_true")
    toy.set_defaults(func=_toy_teacher)


def _generate(args: argparse.Namespace) -> int:
    from megatron_vpmoe.distill.generate import GenerateOptions, format_summary, run_generate

    opts = GenerateOptions(
        teacher_url=args.teacher, prompt_files=args.prompts, out_dir=args.out, model=args.model,
        samples=args.samples, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, seed=args.seed, endpoint=args.endpoint,
        concurrency=args.concurrency, retries=args.retries, timeout_s=args.timeout,
        max_response_bytes=args.max_response_bytes, teacher_moved=args.teacher_moved,
        limit=args.limit, min_chars=args.min_chars, max_chars=args.max_chars,
        keep_truncated=args.keep_truncated, check_answers=not args.no_answer_check,
        dedupe=not args.no_dedupe, shard_size=args.shard_size, progress=not args.no_progress)
    summary = run_generate(opts)
    print(format_summary(summary, args.out))
    return 0


def _toy_teacher(args: argparse.Namespace) -> int:
    from megatron_vpmoe.distill.toy_teacher import build_toy_teacher
    from megatron_vpmoe.eval.tasks import DEFAULT_FEWSHOT_FILE

    data = args.gsm8k or str(DEFAULT_FEWSHOT_FILE)
    if args.arch == "gpt-oss":
        from megatron_vpmoe.distill.gpt_oss_teacher import build_gpt_oss_teacher

        path = build_gpt_oss_teacher(data, args.out, examples=args.examples, overwrite=args.overwrite,
                                     **({} if args.steps is None else {"steps": args.steps}))
        print(f"toy GPT-OSS teacher written to {path}; serve it with: vpmoe serve {path} --port 8000 "
              f"(or: transformers serve {path} --port 8000)")
        return 0
    path = build_toy_teacher(data, args.out, examples=args.examples, overwrite=args.overwrite,
                             **({} if args.steps is None else {"steps": args.steps}))
    print(f"toy teacher written to {path}; serve it with: vpmoe serve {path} --port 8000")
    return 0


def _onpolicy(args: argparse.Namespace) -> int:
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.distill.onpolicy import OnPolicyTrainer

    cfg = load_config(args.config, args.overrides)
    trainer = OnPolicyTrainer(cfg)
    start = trainer.step
    history = trainer.run()
    if history:
        from megatron_vpmoe.distill.onpolicy import score_change

        last = history[-1]
        before, after, how = score_change(history, len(trainer.prompts), cfg.distill.onpolicy.prompts_per_step)
        print(f"on-policy steps {start + 1}..{last['step']}: teacher score "
              f"{before:.4f} -> {after:.4f} ({how}), KL {last['kl']:.4f}, "
              f"{sum(h['dropped'] for h in history)} samples dropped; checkpoints in {cfg.checkpoint_dir}")
    else:
        print(f"nothing to do: already at step {start} of {cfg.train.steps}")
    return 0


def _build_corpus(args: argparse.Namespace) -> int:
    from megatron_vpmoe.distill.corpus import build_corpus, parse_mid_training

    result = build_corpus(args.generated, args.out, tokenizers=args.tokenizer,
                          distill_weight=args.distill_weight,
                          mid_training=parse_mid_training(args.mid_training),
                          reasoning_weight=args.reasoning_weight, final_weight=args.final_weight,
                          run_preprocess=not args.records_only)
    if result["preprocess"] is not None:
        from megatron_vpmoe.data.cli import print_summary

        print_summary(result["preprocess"])
    print(f"{result['records']} chat records -> {result['chat_records']}")
    for variant, prefix in result["prefixes"].items():
        print(f"  {variant}: {prefix}  (snippet {result['snippets'][variant]})")
    return 0
