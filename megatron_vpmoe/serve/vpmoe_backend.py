"""Serving this project's checkpoints: a ``vpmoe train`` checkpoint + its tokenizer as a backend.

The checkpoint directory (or a checkpoint root with a ``latest`` pointer) holds the resolved
run config (``config.yaml``); the model is rebuilt from ``model`` and the weights loaded with
the trainer's single-process loader; the tokenizer is ``data.tokenizer`` of that config (or
``--tokenizer``). Sampling and scoring use ``megatron_vpmoe.model.generation`` (KV cache).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from megatron_vpmoe.serve.backends import (
    HFTokenizerBackend, SampleParams, load_tokenizer_dir, stop_when, truncate_at_stop)
from megatron_vpmoe.utils.errors import InputError


class VpmoeBackend(HFTokenizerBackend):
    def __init__(self, path: str, model_id: Optional[str] = None, tokenizer: Optional[str] = None):
        import torch

        from megatron_vpmoe.config import load_config
        from megatron_vpmoe.model import VpmoeModel
        from megatron_vpmoe.training.checkpoint import load_model_state_dict, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        cfg_path = ckpt / "config.yaml"
        if not cfg_path.is_file():
            raise InputError(f"{ckpt}: no config.yaml; not a vpmoe checkpoint")
        cfg = load_config(str(cfg_path))
        tok_dir = tokenizer or cfg.data.tokenizer
        if not tok_dir:
            raise InputError(f"{cfg_path}: data.tokenizer is not set; pass --tokenizer DIR")
        if not Path(tok_dir).is_absolute() and (ckpt / tok_dir).is_dir():
            tok_dir = str(ckpt / tok_dir)  # a tokenizer stored beside the weights
        self.tokenizer = load_tokenizer_dir(tok_dir)
        self.model = VpmoeModel(cfg.model)
        self.model.load_state_dict(load_model_state_dict(ckpt))
        self.model.eval()
        self.cfg = cfg
        self.vocab_size = cfg.model.vocab_size
        self.model_id = model_id or Path(path).resolve().name
        eos = self.tokenizer.eos_token_id
        self.eos_ids = (eos,) if eos is not None else ()
        self._lock = threading.Lock()
        self._torch = torch

    def generate(self, prompts, params: SampleParams, cancelled=None):
        from megatron_vpmoe.model.generation import generate, sequence_logprobs

        torch = self._torch
        stop = set(params.stop_ids)
        with self._lock, stop_when(self.model, cancelled):
            gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            outs = generate(self.model, prompts, params.max_new_tokens, temperature=params.temperature,
                            top_p=params.top_p, eos_id=next(iter(params.stop_ids), None),
                            generator=gen)
            seqs = [p + o for p, o in zip(prompts, outs)]
            lps = sequence_logprobs(self.model, seqs, [len(p) for p in prompts])
        return [truncate_at_stop(o, lp, stop, params.max_new_tokens) for o, lp in zip(outs, lps)]

    def score(self, sequences, cancelled=None):
        from megatron_vpmoe.model.generation import sequence_logprobs

        with self._lock, stop_when(self.model, cancelled):
            lps = sequence_logprobs(self.model, sequences, [1] * len(sequences))
        return [[None] + lp for lp in lps]

