"""Hugging Face model directory -> native checkpoint (``vpmoe convert from-hf``).

Reads ``config.json`` (the ModelConfig fields ``to-hf`` wrote) and the safetensors shards
(tensors are read one by one into the native model; nothing is held twice), and writes a
checkpoint root in the trainer's layout: ``CKPT/latest``, ``CKPT/step_XXXXXXXX/`` (DCP
shards, ``trainer_state.json``, ``config.yaml``) and the tokenizer in ``CKPT/tokenizer/``,
which the saved config points to. Tensors keep their stored dtype where the native model has
the same one, so an fp32 round trip native -> HF -> native is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_vpmoe.utils.errors import InputError, UsageError


def model_config_from_hf(config: dict, where: str):
    from megatron_vpmoe.config import ModelConfig
    from megatron_vpmoe.utils.errors import ConfigError

    if config.get("model_type") != "vpmoe":
        raise InputError(f"{where}: model_type is {config.get('model_type')!r}, expected 'vpmoe'")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: v for k, v in config.items() if k in names}
    try:
        cfg = ModelConfig(**kwargs)
        cfg.validate()
    except (TypeError, ConfigError) as err:
        raise InputError(f"{where}: {err}") from None
    return cfg


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise InputError(f"{index}: not a safetensors index ({err})") from None
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise InputError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def convert_from_hf(hf_dir: str, ckpt_dir: str, *, overwrite: bool = False) -> Path:
    import torch
    from safetensors import SafetensorError, safe_open

    from megatron_vpmoe.config import config_from_dict, config_to_dict, dump_config
    from megatron_vpmoe.config.loader import read_yaml
    from megatron_vpmoe.convert.checkpoint_io import write_native_checkpoint
    from megatron_vpmoe.convert.to_hf import RUN_CONFIG_FILE
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.tokenizers import load
    from megatron_vpmoe.utils.atomic import atomic_directory

    src = Path(hf_dir)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise InputError(f"{src}: no config.json (not a Hugging Face model directory)")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{config_file}: not UTF-8 text (byte offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{config_file}:{err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(hf_config, dict):
        raise InputError(f"{config_file}: expected a JSON object")
    model_cfg = model_config_from_hf(hf_config, str(config_file))
    out = Path(ckpt_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)  # an unusable output path fails now, before any work

    # the run config: the one to-hf saved, else a minimal one; its model section from config.json
    run_file = src / RUN_CONFIG_FILE
    run = read_yaml(run_file) if run_file.is_file() else {"data": {"mock": True}}
    run = config_to_dict(config_from_dict(run, file=str(run_file)))
    run["model"] = dataclasses.asdict(model_cfg)
    run["data"]["tokenizer"] = "../tokenizer"  # relative to the checkpoint (see megatron_vpmoe.inference.checkpoint.tokenizer_dir)
    run["checkpoint"]["dir"] = None
    cfg = config_from_dict(run, file=str(run_file))

    with torch.device("meta"):  # every tensor comes from the files: no init (it cannot draw on meta)
        model = VpmoeModel(model_cfg, initialize=False)
    model = model.to_empty(device="cpu")
    expected = model.state_dict()
    seen = set()
    for path in _weight_files(src):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    if key not in expected:
                        raise InputError(f"{path}: unexpected tensor {key!r} for this config")
                    tensor = fh.get_tensor(key)
                    if tuple(tensor.shape) != tuple(expected[key].shape):
                        raise InputError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected "
                                         f"{tuple(expected[key].shape)}")
                    with torch.no_grad():
                        expected[key].copy_(tensor)
                    seen.add(key)
        except SafetensorError as err:  # truncated or not safetensors at all
            raise InputError(f"{path}: not a complete safetensors file ({err})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise InputError(f"{src}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    step = int(hf_config.get("vpmoe_training_step") or 0)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        load(src).to_hf().save_pretrained(str(tmp / "tokenizer"))
        write_native_checkpoint(tmp, model, step, dump_config(cfg), source=str(src))
    return out
