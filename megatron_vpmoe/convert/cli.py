"""``vpmoe convert to-hf CKPT OUT_DIR`` and ``vpmoe convert from-hf HF_DIR CKPT``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints to and from Hugging Face format",
                                   description="Convert checkpoints to and from Hugging Face format.")
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    sub.required = True
    to_hf = sub.add_parser("to-hf", help="native checkpoint -> Hugging Face directory",
                           description="Write a Hugging Face model directory from a native checkpoint saved "
                                       "under any parallel layout: config.json with auto_map, remote code, "
                                       "sharded safetensors + index, tokenizer, generation config, model card.")
    to_hf.add_argument("ckpt", metavar="CKPT", help="checkpoint dir (step_XXXXXXXX) or checkpoint root (uses latest)")
    to_hf.add_argument("out", metavar="OUT_DIR")
    to_hf.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (router stays fp32)")
    to_hf.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer dir (default: the run config's)")
    to_hf.add_argument("--max-shard-size", type=float, default=2.0, metavar="GB", help="safetensors shard size")
    to_hf.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    to_hf.set_defaults(func=_to_hf)
    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> native checkpoint",
                             description="Write a native checkpoint root (latest + step dir + tokenizer/) "
                                         "from a directory written by 'vpmoe convert to-hf'.")
    from_hf.add_argument("hf_dir", metavar="HF_DIR")
    from_hf.add_argument("ckpt", metavar="CKPT", help="output checkpoint root")
    from_hf.add_argument("--overwrite", action="store_true", help="replace CKPT if it exists")
    from_hf.set_defaults(func=_from_hf)


def _to_hf(args: argparse.Namespace) -> int:
    from megatron_vpmoe.convert.to_hf import convert_to_hf
    from megatron_vpmoe.utils.errors import UsageError

    if not 0 < args.max_shard_size < 1 << 20:  # also false for nan
        raise UsageError(f"--max-shard-size must be a positive number of GB, got {args.max_shard_size}")
    out = convert_to_hf(args.ckpt, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                        max_shard_bytes=int(args.max_shard_size * (1 << 30)), overwrite=args.overwrite)
    print(f"wrote Hugging Face model to {out}; load it with this package's classes, which run no code from "
          f"the directory: vpmoe eval {out}, or VpmoeForCausalLM.from_pretrained from "
          f"megatron_vpmoe.model.hf_template.modeling_vpmoe (docs/security.md)")
    return 0


def _from_hf(args: argparse.Namespace) -> int:
    from megatron_vpmoe.convert.from_hf import convert_from_hf

    out = convert_from_hf(args.hf_dir, args.ckpt, overwrite=args.overwrite)
    print(f"wrote native checkpoint to {out}")
    return 0
