"""No hidden host syncs in a training step: every Python read of a tensor value (``item``,
``float``, ``int``, ``bool``, ``tolist``, ``numpy``, ``cpu``) made while ``Trainer.train_step`` runs
is recorded with its caller. The only reads allowed are the dropless MoE's token counts (the
grouped GEMM's split sizes, one per expert computation); the metrics are read once per log
interval, by ``_flush_metrics``. (Syncs inside PyTorch's C++ ops, e.g. a ``repeat_interleave``
without ``output_size``, are not seen here; on a GPU ``torch.cuda.set_sync_debug_mode`` finds those.)"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from helpers.train_support import SHAKESPEARE, ByteTokenizer, datasets_for, read_metrics, tiny_config
from helpers.paths import ROOT

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
PACKAGE = ROOT
# where a dropless MoE must learn its groups' sizes on the host (Megatron's grouped GEMM does too)
ALLOWED = {("megatron_vpmoe/model/moe.py", "forward_loop"), ("megatron_vpmoe/model/moe.py", "pad_expert_groups"),
           ("megatron_vpmoe/model/moe.py", "_padded_bmm"), ("megatron_vpmoe/parallel/expert.py", "__call__")}


class SyncRecorder:
    """Patches the tensor-reading methods; ``record(name)`` collects the project frame that read."""

    def __init__(self):
        self.active = None  # the label reads are filed under; None = not recording
        self.reads = {}
        self._saved = {}

    def __enter__(self):
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *args, _original=original, _name=name, **kwargs):
                if self.active is not None:
                    self.reads.setdefault(self.active, []).append(self._caller(_name))
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    @staticmethod
    def _caller(name):
        """The innermost frame of this project's code (or the innermost frame) that read."""
        frames = traceback.extract_stack()[:-2]
        for frame in reversed(frames):
            path = Path(frame.filename).resolve()
            if PACKAGE in path.parents and "tests" not in path.relative_to(PACKAGE).parts:
                return str(path.relative_to(PACKAGE)), frame.name, name
        return frames[-1].filename, frames[-1].name, name


def _train_recording(tmp_path, steps, **sections):
    from megatron_vpmoe.training.trainer import Trainer

    cfg = tiny_config(tmp_path, **sections)
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
    recorder = SyncRecorder()
    step, flush = trainer.train_step, trainer._flush_metrics
    calls = {"step": 0}

    def recorded_step(*args, **kwargs):
        calls["step"] += 1
        recorder.active = f"step{calls['step']}"
        try:
            return step(*args, **kwargs)
        finally:
            recorder.active = None

    def recorded_flush(*args, **kwargs):
        recorder.active = f"flush{calls['step']}"
        try:
            return flush(*args, **kwargs)
        finally:
            recorder.active = None

    trainer.train_step, trainer._flush_metrics = recorded_step, recorded_flush
    with recorder:
        assert trainer.run() == 0
    return cfg, recorder.reads


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"needs {SHAKESPEARE}")
def test_a_training_step_reads_nothing_back_but_the_moe_split_sizes(tmp_path):
    steps, interval = 4, 4
    cfg, reads = _train_recording(tmp_path, steps, train={"steps": steps, "recompute": "selective"},
                                  log={"interval": interval, "progress_bar": False})
    step_reads = {label: r for label, r in reads.items() if label.startswith("step")}
    hidden = sorted({(f, fn, m) for r in step_reads.values() for (f, fn, m) in r if (f, fn) not in ALLOWED})
    assert not hidden, f"host syncs inside the training step: {hidden}"
    # the allowed ones are bounded: a handful per MoE layer call (forward + selective recompute)
    moe_layers = cfg.model.num_layers - cfg.model.moe_first_k_dense
    micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
    for label, r in step_reads.items():
        assert len(r) <= 2 * moe_layers * micro, (label, r)
    # the metrics were read after the first step (loss and tokens/s on screen at once) and then once,
    # at the log interval: the detector sees reads where they are
    assert set(reads) - set(step_reads) == {"flush1", f"flush{steps}"}
    assert reads["flush1"], "the first step's flush must read the metrics back"
    assert reads[f"flush{steps}"], "the flush must read the metrics back"
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in records)
    assert "router_bias_max" in records[-1] and "router_bias_max" not in records[0]


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path, monkeypatch):
    """Fused AdamW's found_inf skips the update without a host read: weights, moments, the step
    count and the expert biases stay as they were, and the log reports the skip."""
    from megatron_vpmoe.training.trainer import NAN_HOOK_ENV, Trainer

    monkeypatch.setenv(NAN_HOOK_ENV, "2")
    cfg = tiny_config(tmp_path, train={"steps": 2}, log={"interval": 2, "progress_bar": False})
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
    snapshots = []
    step = trainer.train_step

    def snapshot_after(*args, **kwargs):
        out = step(*args, **kwargs)
        params = [p.detach().clone() for p in trainer.raw_model.parameters()]
        buffers = {n: b.clone() for n, b in trainer.raw_model.named_buffers() if n.endswith("expert_bias")}
        steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
        snapshots.append((params, buffers, steps))
        return out

    trainer.train_step = snapshot_after
    assert trainer.run() == 0
    (p1, b1, s1), (p2, b2, s2) = snapshots
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(torch.equal(b1[k], b2[k]) for k in b1) and b1
    assert s1 == s2 == [1.0] * len(s1)
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, True]
