"""The backend for this project's own model: a ``VpmoeModel`` and its tokenizer, generating with its KV cache."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch

from megatron_vpmoe.inference.backend import Backend, SampleParams, stop_when, truncate_at_stop


class NativeBackend(Backend):
    """A checkpoint opened with :func:`~megatron_vpmoe.inference.checkpoint.open_checkpoint`, or
    an in-memory ``model`` + ``tokenizer`` (``tokenizer=None``: token ids only). Reads
    ``max_length`` tokens (default: the run's ``data.seq_length``); generation is
    :func:`megatron_vpmoe.model.generation.generate` (KV cache)."""

    name = "native"

    def __init__(self, path: Optional[str] = None, *, model=None, tokenizer=None, tokenizer_dir: Optional[str] = None,
                 model_id: Optional[str] = None, max_length: Optional[int] = None, batch_size: int = 8,
                 device: str = "cpu"):
        self.path = path
        self.batch_size = batch_size
        self.device = torch.device(device)
        if model is None:
            from megatron_vpmoe.inference.checkpoint import open_checkpoint, run_name

            cfg, model, tokenizer = open_checkpoint(path, tokenizer_dir)
            max_length = max_length or cfg.data.seq_length
            model_id = model_id or run_name(cfg)  # not "checkpoints", the root's directory name
        self.model = model.to(self.device).eval()
        self.max_length = int(max_length or 2048)
        self.vocab_size = self.model.cfg.vocab_size
        self.model_id = model_id or (Path(path).resolve().name if path else "vpmoe")
        if tokenizer is not None:
            self._set_tokenizer(tokenizer)
        self._lock = threading.RLock()  # one call at a time: the generator and cache are per call

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids.to(self.device)).float().cpu()  # right padding: causal, no mask needed

    def generate(self, prompts, params: SampleParams, cancelled=None):
        from megatron_vpmoe.model.generation import generate

        stop = set(params.stop_ids)
        with self._lock, stop_when(self.model, cancelled):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed)
            outs = generate(self.model, [list(p) for p in prompts], params.max_new_tokens,
                            temperature=params.temperature, top_p=params.top_p,
                            eos_id=next(iter(params.stop_ids), None), generator=gen)
            if params.logprobs:  # teacher-forced: the untempered log-prob of each sampled token
                scored = self.score([list(p) + o for p, o in zip(prompts, outs)], [len(p) for p in prompts])
                lps = [lp.tolist() for lp, _ in scored]
            else:
                lps = [[] for _ in outs]
        return [truncate_at_stop(o, lp, stop, params.max_new_tokens) for o, lp in zip(outs, lps)]
