"""Inference after training: open a checkpoint or Hugging Face directory as a :class:`Backend` that scores and generates.

``open_checkpoint(path) -> (config, model, tokenizer)`` opens a training checkpoint;
``open_backend(path)`` gives the backend for a checkpoint (:class:`NativeBackend`) or a Hugging
Face directory (:class:`HFBackend`); :func:`token_logprobs` is the one log-prob helper. Serving,
evaluation, distillation and conversion use this package; nothing else opens checkpoints for
inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_vpmoe.inference.backend import Backend, Cancelled, Sampled, SampleParams
from megatron_vpmoe.inference.checkpoint import open_checkpoint
from megatron_vpmoe.inference.logprobs import token_logprobs
from megatron_vpmoe.utils.errors import InputError


def open_backend(path: str, *, model_id: Optional[str] = None, tokenizer: Optional[str] = None,
                 batch_size: int = 8, max_length: Optional[int] = None, device: str = "cpu",
                 trust_remote_code: bool = False) -> Backend:
    """The backend for ``path``: a Hugging Face model directory (has ``config.json``) or a
    training checkpoint (``tokenizer``: its tokenizer directory instead of ``data.tokenizer``;
    ``trust_remote_code``: let a Hugging Face directory run the Python code it ships)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such checkpoint or model directory")
    if (p / "config.json").is_file():
        from megatron_vpmoe.inference.hf import HFBackend

        return HFBackend(str(p), model_id=model_id, batch_size=batch_size, max_length=max_length,
                         device=device, trust_remote_code=trust_remote_code)
    from megatron_vpmoe.inference.native import NativeBackend

    return NativeBackend(str(p), tokenizer_dir=tokenizer, model_id=model_id, batch_size=batch_size,
                         max_length=max_length, device=device)


__all__ = ["Backend", "Cancelled", "Sampled", "SampleParams", "open_backend", "open_checkpoint", "token_logprobs"]
