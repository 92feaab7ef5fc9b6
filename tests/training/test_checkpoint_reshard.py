"""Checkpoints reshard: a state saved with tensor-parallel DTensor shards (TP=2 over 2 gloo ranks,
torch's ColwiseParallel/RowwiseParallel on the dense MLP) loads, with its
optimizer state, into the plain single-process model. This is the checkpoint side of
"save at TP=2, resume at TP=1"; the trainer itself drives data parallelism only."""

from __future__ import annotations

import torch

from helpers.distributed import run_distributed
from helpers.train_support import TINY_OVERRIDES


def _model_cfg():
    from megatron_vpmoe.config import ModelConfig

    return ModelConfig(**{k: v for k, v in TINY_OVERRIDES["model"].items()})


def _save_tp2(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from megatron_vpmoe.config import OptimizerConfig
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.training.checkpoint import CheckpointManager
    from megatron_vpmoe.training.optimizer import build_optimizer

    torch.manual_seed(0)
    model = VpmoeModel(_model_cfg())
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"layers.0.mlp.linear_fc1": ColwiseParallel(),
                                     "layers.0.mlp.linear_fc2": RowwiseParallel()})
    assert isinstance(model.layers["0"].mlp.linear_fc1.weight, DTensor)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(ids[:, :-1], labels=ids[:, 1:]).mean().backward()
        opt.step()
        opt.zero_grad()
    CheckpointManager(root).save(2, model, opt, {"consumed_samples": 0})
    # the full (unsharded) values this layout holds, for the single-process comparison
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().numpy().copy()
            for k, v in model.state_dict().items()}
    fc1 = model.layers["0"].mlp.linear_fc1.weight
    exp_avg = opt.state[fc1]["exp_avg"].full_tensor().numpy().copy()
    return full, exp_avg, tuple(fc1.to_local().shape)


def test_tp2_checkpoint_loads_into_one_process(tmp_path):
    from megatron_vpmoe.config import OptimizerConfig
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.training.checkpoint import CheckpointManager
    from megatron_vpmoe.training.optimizer import build_optimizer

    full, exp_avg, local_shape = run_distributed(_save_tp2, 2, str(tmp_path))[0]
    assert local_shape[0] * 2 == full["layers.0.mlp.linear_fc1.weight"].shape[0]  # really sharded
    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model = VpmoeModel(_model_cfg())
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2))
    state = CheckpointManager(tmp_path).load(tmp_path, model, opt)
    assert state["step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, torch.from_numpy(full[key])), key
    fc1 = model.layers["0"].mlp.linear_fc1.weight
    assert torch.equal(opt.state[fc1]["exp_avg"], torch.from_numpy(exp_avg))
