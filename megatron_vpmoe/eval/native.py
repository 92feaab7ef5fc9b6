"""The evaluation backend for this project's own model: ``VpmoeModel`` plus its tokenizer.

Opens a training checkpoint (any parallel layout; read on CPU through
``megatron_vpmoe.training.checkpoint.load_model_state_dict``) with the run config saved beside
it and the tokenizer directory that config names, or wraps an in-memory model
(:meth:`NativeBackend.from_model`, used by the tokenizer experiment). Generation uses the
model's KV-cached greedy ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_vpmoe.eval.backends import TokenizerBackend
from megatron_vpmoe.utils.errors import InputError


def load_hf_tokenizer(directory: str | Path):
    """The student tokenizer in a directory as a ``PreTrainedTokenizerFast``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: tokenizer directory not found")
    from megatron_vpmoe.tokenizers import load

    hf_format = (directory / "tokenizer.json").is_file()
    try:
        return load(str(directory)).to_hf()
    except Exception:  # noqa: BLE001 - not a `vpmoe tokenizer` directory: read it as plain HF below
        if not hf_format:
            raise
    from transformers import PreTrainedTokenizerFast

    if not hf_format:
        raise InputError(f"{directory}: no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def resolve_tokenizer_dir(ckpt: Path, value: str) -> Path:
    """A run config's ``data.tokenizer`` as seen from checkpoint ``ckpt``: relative to the
    checkpoint directory if it exists there (``from-hf`` writes ``CKPT/tokenizer``), else as given."""
    beside = Path(ckpt) / value
    return beside if not Path(value).is_absolute() and beside.is_dir() else Path(value)


class NativeBackend(TokenizerBackend):
    name = "native"

    def __init__(self, path: Optional[str] = None, *, batch_size: int = 8, max_length: Optional[int] = None,
                 device: str = "cpu", model=None, tokenizer=None):
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.path = path
        if model is None:
            model, tokenizer, seq_length = self._open(path)
            max_length = max_length or seq_length
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length or 2048)
        eos = tokenizer.eos_token_id
        self.eos_token_ids = (eos,) if eos is not None else ()

    @classmethod
    def from_model(cls, model, tokenizer, *, max_length: int, batch_size: int = 8) -> "NativeBackend":
        return cls(None, batch_size=batch_size, max_length=max_length, model=model, tokenizer=tokenizer)

    @staticmethod
    def _open(path):
        from megatron_vpmoe.config import load_config
        from megatron_vpmoe.model import VpmoeModel
        from megatron_vpmoe.training.checkpoint import load_model_state_dict, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        config_file = ckpt / "config.yaml"
        if not config_file.is_file():
            raise InputError(f"{ckpt}: no config.yaml beside the checkpoint")
        cfg = load_config(str(config_file))
        if not cfg.data.tokenizer:
            raise InputError(f"{config_file}: data.tokenizer is not set; cannot tokenize text")
        tokenizer = load_hf_tokenizer(resolve_tokenizer_dir(ckpt, cfg.data.tokenizer))
        model = VpmoeModel(cfg.model)
        model.load_state_dict(load_model_state_dict(ckpt), strict=True)
        return model, tokenizer, cfg.data.seq_length

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids.to(self.device)).float().cpu()  # right padding: causal, no mask needed

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> List[List[int]]:
        from megatron_vpmoe.model.generation import generate

        rows = [list(p)[-max(1, self.max_length - max_new_tokens):] for p in prompts]
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        out: List[List[int]] = []
        for b in range(0, len(rows), self.batch_size):
            out += generate(self.model, rows[b : b + self.batch_size], max_new_tokens, eos_id=eos)
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "path": self.path, "max_length": self.max_length}
