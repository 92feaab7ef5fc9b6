"""PipelineRunner's schedule choice at its boundary: 1F1B from micro-batches == stages up (GPipe only
below), interleaved 1F1B with model chunks; each schedule gets this rank's stages and the count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed.pipelining as pipelining

from megatron_vpmoe.parallel.pipeline import PipelineRunner


class _Fake:
    def __init__(self, stages, n_micro, loss_fn=None, scale_grads=True):
        self.stages, self.n_micro, self.loss_fn, self.scale_grads = stages, n_micro, loss_fn, scale_grads


@pytest.fixture
def runner(monkeypatch):
    for name in ("Schedule1F1B", "ScheduleGPipe", "ScheduleInterleaved1F1B"):
        monkeypatch.setattr(pipelining, name, type(name, (_Fake,), {}))

    def make(pp, vpp):
        r = PipelineRunner(model=None, ctx=SimpleNamespace(pp=pp, vpp=vpp), device=None)
        r._stages[(2, 8)] = [f"stage{i}" for i in range(vpp)]  # built stages (no process group here)
        return r

    return make


@pytest.mark.parametrize("pp, n_micro, expected", [
    (2, 1, "ScheduleGPipe"),
    (2, 2, "Schedule1F1B"),  # micro-batches == stages: 1F1B, not GPipe
    (2, 3, "Schedule1F1B"),
    (4, 3, "ScheduleGPipe"),
    (4, 4, "Schedule1F1B"),
    (4, 5, "Schedule1F1B"),
    (4, 16, "Schedule1F1B"),
])
def test_1f1b_from_as_many_micro_batches_as_stages(runner, pp, n_micro, expected):
    sched = runner(pp, 1).schedule(2, 8, n_micro)
    assert type(sched).__name__ == expected
    assert sched.stages == "stage0" and sched.n_micro == n_micro and sched.scale_grads is False


@pytest.mark.parametrize("pp, vpp, n_micro", [(2, 2, 2), (2, 2, 4), (4, 2, 4), (2, 4, 8)])
def test_interleaved_with_model_chunks(runner, pp, vpp, n_micro):
    sched = runner(pp, vpp).schedule(2, 8, n_micro)
    assert type(sched).__name__ == "ScheduleInterleaved1F1B"
    assert sched.stages == [f"stage{i}" for i in range(vpp)] and sched.n_micro == n_micro


def test_one_schedule_per_shape_and_count(runner):
    r = runner(2, 1)
    first = r.schedule(2, 8, 4)
    assert r.schedule(2, 8, 4) is first
    assert r.schedule(2, 8, 1) is not first and type(r.schedule(2, 8, 1)).__name__ == "ScheduleGPipe"
