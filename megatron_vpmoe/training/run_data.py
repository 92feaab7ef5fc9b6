"""The data a training run reads: its tokenizer (checked against the vocabulary) and datasets sized to the schedule."""

from __future__ import annotations

import os



def load_run_tokenizer(cfg):
    """``data.tokenizer``'s tokenizer (None when unset); more tokens than ``model.vocab_size`` is a ConfigError."""
    if not cfg.data.tokenizer:
        return None
    from megatron_vpmoe.tokenizers.loader import load_for_model

    return load_for_model(cfg.data.tokenizer, cfg.model.vocab_size)


def num_samples(t) -> tuple:
    """Samples ``(train, valid, test)`` the schedule ``t`` (``train`` config) reads."""
    train = t.steps * t.global_batch_size
    evals = (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    valid = max(1, t.eval_iters * t.global_batch_size) if evals else 1
    return train, valid, max(1, t.eval_iters * t.global_batch_size)


def build_run_datasets(cfg, tok) -> tuple:
    """``(train, valid)`` from ``data.blend`` (or mock data) through the data package."""
    from megatron_vpmoe.data.dataset import build_datasets

    eod = getattr(tok, "eod_id", 0) if tok is not None else 0
    pad = getattr(tok, "pad_id", eod) if tok is not None else 0
    cache = cfg.data.cache_dir or os.path.join(cfg.run.dir, "data_cache")
    # every rank at once: megatron-core's builder lets rank 0 build the index cache first
    # and the other ranks read it (its own barriers)
    train, valid, _test = build_datasets(cfg.data, seed=cfg.run.seed, num_samples=num_samples(cfg.train),
                                         eod_id=eod, pad_id=pad, cache_dir=cache,
                                         vocab_size=cfg.model.vocab_size)
    return train, valid
