"""Opening a training checkpoint for inference: its run config (``config.yaml``) -> the model -> the tokenizer beside it.

A checkpoint directory (or a checkpoint root with a ``latest`` pointer, any parallel layout)
holds the resolved run config; the model is rebuilt from its ``model`` section and the weights
are read on CPU with the trainer's single-process loader; the tokenizer is ``data.tokenizer`` of
that config, looked up relative to the checkpoint first (``from-hf`` writes ``CKPT/../tokenizer``),
or the directory the caller names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from megatron_vpmoe.utils.errors import InputError


def checkpoint_config(path) -> Tuple[Path, object]:
    """``(checkpoint directory, run config)`` of a checkpoint or checkpoint root."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.training.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise InputError(f"{ckpt}: no config.yaml beside the checkpoint; not a vpmoe checkpoint")
    return ckpt, load_config(str(config_file))


def run_name(cfg) -> str:
    """What a checkpoint's model is called (served model id, model card title): the run config's
    ``run.name``, else its run directory's name (a checkpoint root is ``RUN/checkpoints``)."""
    return cfg.run.name or Path(cfg.run.dir).name


def tokenizer_dir(ckpt: Path, cfg, override: Optional[str] = None) -> Path:
    """The tokenizer directory of checkpoint ``ckpt``: ``override`` when given, else the run
    config's ``data.tokenizer``, relative to the checkpoint if it exists there, else as written."""
    if override:
        return Path(override)
    value = cfg.data.tokenizer
    if not value:
        raise InputError(f"{Path(ckpt) / 'config.yaml'}: data.tokenizer is not set, so there is no tokenizer "
                         f"to read text with (vpmoe serve and convert take --tokenizer DIR)")
    beside = Path(ckpt) / value
    return beside if not Path(value).is_absolute() and beside.is_dir() else Path(value)


def open_checkpoint(path, tokenizer: Optional[str] = None):
    """``(config, model, tokenizer)`` of a checkpoint: the run config, the ``VpmoeModel`` with its
    weights (CPU, eval mode) and the ``transformers`` tokenizer (``tokenizer``: another directory)."""
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.tokenizers import load
    from megatron_vpmoe.training.checkpoint import load_model_state_dict

    ckpt, cfg = checkpoint_config(path)
    hf_tokenizer = load(tokenizer_dir(ckpt, cfg, tokenizer)).to_hf()
    model = VpmoeModel(cfg.model)
    model.load_state_dict(load_model_state_dict(ckpt), strict=True)
    return cfg, model.eval(), hf_tokenizer
