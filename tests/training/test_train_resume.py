"""Exact resume on 2 CPU processes (20 steps == 10 + resume + 10) and DP=2 -> DP=1 resharding."""

from __future__ import annotations

import pytest
import torch

from helpers.distributed import run_distributed
from helpers.paths import ROOT
from helpers.train_support import ByteTokenizer, datasets_for, read_metrics, tiny_config

# 2 ranks x micro-batch 1, global batch 4: 2 accumulation steps per rank; validation every 5
# steps; MoE expert-bias updates and a cosine schedule: everything a resume must restore.
SECTIONS = dict(train={"steps": 20, "eval_interval": 5, "eval_iters": 1},
                checkpoint={"interval": 0, "keep_last": 2})


def _train(rank, world, run_dir, stop_at):
    from megatron_vpmoe.training.trainer import Trainer

    cfg = tiny_config(run_dir, **SECTIONS)
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
    code = trainer.run(stop_at_step=stop_at)
    params = {k: v.detach().numpy().copy() for k, v in trainer.raw_model.state_dict().items()}
    return code, trainer.step, params if rank == 0 else None


def test_resume_is_bit_identical_on_two_processes(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    ref = run_distributed(_train, 2, str(full), None)
    first = run_distributed(_train, 2, str(split), 10)
    assert [r[:2] for r in first] == [(0, 10), (0, 10)]
    second = run_distributed(_train, 2, str(split), None)
    assert [r[:2] for r in second] == [(0, 20), (0, 20)]

    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 21))  # the resumed run continues the same log
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert [r["loss"] for r in read_metrics(full, "valid")] == [r["loss"] for r in read_metrics(split, "valid")]
    assert a[-1]["loss"] < a[0]["loss"]
    for key, value in ref[0][2].items():
        assert (value == second[0][2][key]).all(), key


def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path):
    """Data-parallel 2 -> 1: the same weights and optimizer state, the same data position."""
    from megatron_vpmoe.training.trainer import Trainer

    run_distributed(_train, 2, str(tmp_path), 10)
    cfg = tiny_config(tmp_path, **SECTIONS)
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
    trainer._maybe_resume()
    assert trainer.step == 10
    assert len(trainer.optimizer.state) == len(list(trainer.raw_model.parameters()))
    from megatron_vpmoe.training.checkpoint import load_model_state_dict

    saved = load_model_state_dict(tmp_path / "checkpoints")
    for key, value in trainer.raw_model.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key
    assert trainer.run() == 0 and trainer.step == 20
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 20 and all(map(lambda x: x == x, losses))


def _train_tiny_cpu(rank, world, run_dir, steps):
    from megatron_vpmoe.training.trainer import Trainer

    # examples/configs/tiny-cpu.yaml's model and batch on the bundled Shakespeare bytes
    from megatron_vpmoe.config import load_config

    cfg = load_config(ROOT / "examples" / "configs" / "tiny-cpu.yaml", [
        f"run.dir={run_dir}", "data.mock=true", "data.tokenizer=null", f"train.steps={steps}",
        "train.eval_interval=100", "log.progress_bar=false", "checkpoint.interval=100"])
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=rank != 0)
    assert trainer.run() == 0
    return trainer.summary["first"], trainer.summary["last"], trainer.summary["valid"]


@pytest.mark.long
def test_tiny_cpu_config_learns_on_two_processes(tmp_path):
    """The quickstart's scale: tiny-cpu.yaml for 300 steps on 2 CPU processes; the loss clearly falls."""
    first, last, valid = run_distributed(_train_tiny_cpu, 2, str(tmp_path), 300)[0]
    print(f"\nstart loss {first['loss']:.3f} bits/byte {first['bits_per_byte']:.3f}; "
          f"end loss {last['loss']:.3f} bits/byte {last['bits_per_byte']:.3f}; "
          f"valid loss {valid['loss']:.3f} bits/byte {valid['bits_per_byte']:.3f}")
    assert last["loss"] < 0.6 * first["loss"]
    assert valid["bits_per_byte"] < 3.5


def test_reader_workers_do_not_change_the_sample_order(tmp_path):
    from helpers.train_support import run_training

    for workers in (0, 2):
        cfg = tiny_config(tmp_path / str(workers), train={"steps": 4}, data={"num_workers": workers})
        assert run_training(cfg) == 0
    assert [r["loss"] for r in read_metrics(tmp_path / "0")] == [r["loss"] for r in read_metrics(tmp_path / "2")]


def _train_dropout(rank, world, root):
    """An uninterrupted 6-step run, and one stopped at step 3 and resumed, in one process."""
    from megatron_vpmoe.training.trainer import Trainer

    def run(run_dir, stop_at):
        cfg = tiny_config(run_dir, model={"hidden_dropout": 0.1}, train={"steps": 6},
                          checkpoint={"interval": 0, "keep_last": 1})
        trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
        return trainer.run(stop_at_step=stop_at), trainer.step

    return [run(f"{root}/full", None), run(f"{root}/split", 3), run(f"{root}/split", None)]


def test_resume_with_dropout_is_bit_identical(tmp_path):
    """Dropout draws from the global RNG, so a resume is exact only if nothing between restoring
    the RNG and the next step draws from it (the DataLoader iterator once did, for its base seed)."""
    assert run_distributed(_train_dropout, 1, str(tmp_path)) == [[(0, 6), (0, 3), (0, 6)]]
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
