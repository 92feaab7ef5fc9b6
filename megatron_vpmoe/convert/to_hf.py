"""Native checkpoint -> Hugging Face model directory (``vpmoe convert to-hf``).

Writes ``config.json`` (with ``auto_map`` for ``trust_remote_code``), the remote code
(``configuration_vpmoe.py``, ``modeling_vpmoe.py`` from ``model/hf_template/``), sharded
``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``, the student
tokenizer's files, ``generation_config.json``, a README model card, and the run config
(``vpmoe_config.yaml``, so ``from-hf`` restores it). Tensors stream from the checkpoint one
shard at a time. The directory appears complete or not at all (atomic rename).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_vpmoe.inference.checkpoint import run_name
from megatron_vpmoe.tokenizers.specials import HARMONY_MARKERS
from megatron_vpmoe.utils.errors import InputError, UsageError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model" / "hf_template"
REMOTE_CODE = ("configuration_vpmoe.py", "modeling_vpmoe.py")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
FP32_KEYS = (".router.weight", ".router.expert_bias")  # the router runs in fp32 natively
RUN_CONFIG_FILE = "vpmoe_config.yaml"
HARMONY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}"
    "{% if m['role'] == 'assistant' %}<|channel|>final{% endif %}<|message|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|return|>{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def hf_config_dict(model_cfg, *, max_position_embeddings: int, dtype: str, tokenizer=None, step=None) -> dict:
    """``config.json`` contents: every ModelConfig field plus the Hugging Face bookkeeping."""
    import dataclasses

    from megatron_vpmoe.model.hf_template.configuration_vpmoe import VpmoeConfig

    fields = dataclasses.asdict(model_cfg)
    accepted = set(VpmoeConfig.__init__.__code__.co_varnames)
    extra = {}
    if tokenizer is not None:
        extra = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    hf = VpmoeConfig(**{k: v for k, v in fields.items() if k in accepted},
                     max_position_embeddings=max_position_embeddings, **extra)
    out = hf.to_dict()
    out.update(
        architectures=["VpmoeForCausalLM"],
        auto_map={"AutoConfig": "configuration_vpmoe.VpmoeConfig",
                  "AutoModelForCausalLM": "modeling_vpmoe.VpmoeForCausalLM"},
        torch_dtype=dtype, dtype=dtype,
    )
    # training-only router knobs are kept so from-hf rebuilds the exact ModelConfig
    for key in ("moe_router_bias_update_rate", "moe_aux_loss_coeff", "attention_dropout", "hidden_dropout"):
        out[key] = fields[key]
    if step is not None:
        out["vpmoe_training_step"] = step
    return out


def model_card(cfg, counts, step, source: str, dtype: str) -> str:
    m = cfg.model
    blend = [str(entry[1]) for entry in cfg.data.blend] or (["mock data"] if cfg.data.mock else [])
    return "\n".join([
        "---", "library_name: transformers", "tags: [vpmoe, mixture-of-experts, custom_code]", "---", "",
        f"# {run_name(cfg)} (VPMoE)", "",
        f"Converted from `{source}` (training step {step}) by `vpmoe convert to-hf`; weights in {dtype}.",
        "Load with this package's classes, which run no code from this directory: "
        "`from megatron_vpmoe.model.hf_template.modeling_vpmoe import VpmoeForCausalLM; "
        "VpmoeForCausalLM.from_pretrained(path)` (what `vpmoe eval` does). "
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` runs the directory's "
        "`modeling_vpmoe.py`: only for a directory from a trusted source.", "",
        "## Architecture", "",
        "| | |", "|---|---|",
        f"| layers | {m.num_layers} ({m.moe_first_k_dense} dense, {m.num_layers - m.moe_first_k_dense} MoE) |",
        f"| hidden size | {m.hidden_size} |",
        f"| attention | {m.num_attention_heads} heads, {m.num_query_groups} KV groups, head dim {m.kv_channels}, "
        f"QK-norm {m.qk_layernorm}, sinks {m.softmax_offset}, value residual {m.value_residual} |",
        f"| local:global | {m.local_global_pattern[0]}:{m.local_global_pattern[1]}, sliding window {m.window_size} |",
        f"| positions | {m.position_embedding_type}, base {m.rotary_base} |",
        f"| experts | {m.num_moe_experts} routed (top-{m.moe_router_topk}, {m.moe_router_num_groups} groups, "
        f"{m.moe_router_score_function}), width {m.moe_ffn_hidden_size}; shared width "
        f"{m.moe_shared_expert_intermediate_size} |",
        f"| vocabulary | {m.vocab_size} |",
        f"| training context | {cfg.data.seq_length} |", "",
        "## Parameters", "",
        "| | count |", "|---|---:|",
        f"| total | {counts.total:,} |",
        f"| active per token | {counts.active:,} |",
        f"| embedding + head | {counts.embedding_head:,} ({counts.embedding_head / counts.active:.1%} of active) |",
        "", "## Training data", "",
        *(f"- `{name}`" for name in blend), "",
    ])


def _save_tokenizer(tokenizer, out: Path) -> None:
    if not getattr(tokenizer, "chat_template", None):
        vocab = tokenizer.get_vocab()
        harmony = all(t in vocab for t in HARMONY_MARKERS)
        tokenizer.chat_template = HARMONY_CHAT_TEMPLATE if harmony else PLAIN_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))


def convert_to_hf(ckpt_path: str, out_dir: str, *, dtype: str = "fp32", tokenizer_dir: Optional[str] = None,
                  max_shard_bytes: int = 2 << 30, overwrite: bool = False, progress: bool = True) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megatron_vpmoe.convert.checkpoint_io import group_by_bytes, iter_tensor_groups, model_tensor_metadata
    from megatron_vpmoe.inference.checkpoint import checkpoint_config, tokenizer_dir as checkpoint_tokenizer_dir
    from megatron_vpmoe.model.params import count_parameters
    from megatron_vpmoe.tokenizers import load
    from megatron_vpmoe.training.checkpoint import read_trainer_state
    from megatron_vpmoe.utils.atomic import atomic_directory, atomic_write_text

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)  # an unusable output path fails now, before any work
    ckpt, cfg = checkpoint_config(ckpt_path)
    step = read_trainer_state(ckpt).get("step")
    tok_path = checkpoint_tokenizer_dir(ckpt, cfg, tokenizer_dir)
    tokenizer = load(tok_path).to_hf()
    if len(tokenizer) > cfg.model.vocab_size:
        raise InputError(f"{tok_path}: tokenizer has {len(tokenizer)} tokens, more than model.vocab_size "
                         f"{cfg.model.vocab_size}")

    meta = model_tensor_metadata(ckpt)
    target = getattr(torch, DTYPES[dtype])

    def out_dtype(key):
        return torch.float32 if key.endswith(FP32_KEYS) else target

    itemsize = {k: torch.empty(0, dtype=out_dtype(k)).element_size() for k in meta}
    groups = group_by_bytes(meta, max_shard_bytes, itemsize)
    iterator = iter_tensor_groups(ckpt, groups)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(groups), desc="to-hf shards", unit="shard", disable=None)  # None: terminal only
    with atomic_directory(out, overwrite=overwrite) as tmp:
        weight_map, total = {}, 0
        for i, tensors in enumerate(iterator):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            shard = {k: t.to(out_dtype(k)).contiguous() for k, t in tensors.items()}
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update({k: name for k in shard})
            del shard, tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(cfg.model, max_position_embeddings=cfg.data.seq_length,
                                dtype=DTYPES[dtype], tokenizer=tokenizer, step=step)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        for name in REMOTE_CODE:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        _save_tokenizer(tokenizer, tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(str(tmp))
        atomic_write_text(tmp / "README.md", model_card(cfg, count_parameters(cfg.model), step, str(ckpt), dtype))
        shutil.copyfile(ckpt / "config.yaml", tmp / RUN_CONFIG_FILE)
    return out
