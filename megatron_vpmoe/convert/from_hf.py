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
import math
import os
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
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{index}: not a safetensors index ({err})") from None
        except RecursionError:  # json recurses per nesting level
            raise InputError(f"{index}: JSON nested too deeply to parse") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: weight_map must map tensor names to file names")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise InputError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


# bytes per element of the safetensors dtype names (header strings)
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """``{tensor name: (file, shape, dtype name)}`` from the safetensors headers, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    if key in out:
                        raise InputError(f"{path}: tensor {key!r} is also in {out[key][0]}")
                    part = fh.get_slice(key)
                    out[key] = (path, tuple(part.get_shape()), part.get_dtype())
        except SafetensorError as err:  # truncated or not safetensors at all
            raise InputError(f"{path}: not a complete safetensors file ({err})") from None
        except FileNotFoundError:
            raise InputError(f"{path}: missing (named by the safetensors index)") from None
    return out


def check_against_config(cfg, headers: dict, where: str) -> None:
    """Refuse a ``config.json`` whose sizes disagree with the weights before any model is built
    (building even a meta model of 10,000 layers takes a minute): the values its state dict holds
    (parameters, closed form, and each router's ``expert_bias``) against the elements in the files."""
    from megatron_vpmoe.model.params import count_parameters

    stored = sum(math.prod(shape) for _, shape, _ in headers.values())
    moe_layers = sum(1 for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    described = count_parameters(cfg).total + moe_layers * (cfg.num_moe_experts or 0)
    if described != stored:
        raise InputError(f"{where}: describes a model of {described:,} parameters, the safetensors files hold "
                         f"{stored:,} values (config.json does not match the weights)")


def available_memory() -> int:
    """Bytes this host can still allocate: ``MemAvailable`` of /proc/meminfo, else the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(need: int, where: str) -> None:
    """Refuse (one line) a conversion needing more than the host's available memory."""
    have = available_memory()
    if need > have:
        raise InputError(f"{where}: converting needs about {need / 2**30:,.1f} GiB (the model plus its largest "
                         f"tensor), this host has {have / 2**30:,.1f} GiB available")


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
    except RecursionError:  # json recurses per nesting level
        raise InputError(f"{config_file}: JSON nested too deeply to parse") from None
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

    files = _weight_files(src)
    headers = read_headers(files)  # names, shapes and dtypes only: nothing is allocated yet
    check_against_config(model_cfg, headers, str(config_file))
    # the native model (fp32) plus the largest tensor read from the files, before building anything
    check_memory(4 * sum(math.prod(shape) for _, shape, _ in headers.values()) + max(
        (math.prod(shape) * _DTYPE_BYTES.get(dtype, 8) for _, shape, dtype in headers.values()), default=0),
        str(config_file))
    with torch.device("meta"):  # every tensor comes from the files: no init (it cannot draw on meta)
        model = VpmoeModel(model_cfg, initialize=False)
    expected = model.state_dict()  # meta tensors: shapes and dtypes, no memory
    for key, (path, shape, _) in headers.items():
        if key not in expected:
            raise InputError(f"{path}: unexpected tensor {key!r} for this config")
        if shape != tuple(expected[key].shape):
            raise InputError(f"{path}: {key} has shape {shape}, expected {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(headers))
    if missing:
        raise InputError(f"{src}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    model = model.to_empty(device="cpu")
    expected = model.state_dict()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    with torch.no_grad():
                        expected[key].copy_(fh.get_tensor(key))
        except SafetensorError as err:  # truncated or not safetensors at all
            raise InputError(f"{path}: not a complete safetensors file ({err})") from None

    step = int(hf_config.get("vpmoe_training_step") or 0)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        load(src).to_hf().save_pretrained(str(tmp / "tokenizer"))
        write_native_checkpoint(tmp, model, step, dump_config(cfg), source=str(src))
    return out
