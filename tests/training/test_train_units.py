"""Unit tests of the training pieces: objective, bits per byte, schedules, optimizer groups,
rank discovery for torchrun/srun/mpirun, and the global-batch sampler."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_vpmoe.config import TrainConfig
from megatron_vpmoe.training import loss as L
from megatron_vpmoe.training.batches import GlobalBatchSampler
from megatron_vpmoe.training.distributed import discover_ranks, rendezvous_env
from megatron_vpmoe.training.schedule import learning_rate


def test_objective_combines_span_means_as_documented():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    roles = torch.tensor([[0, 1, 1, 1, 2, 3]])
    w = L.LossWeights(text=1.0, reasoning=0.5, final=2.0)
    obj = L.Objective(L.role_counts(roles), w)
    loss, part = obj(nll, roles)
    mean_r, mean_f, mean_t = (2 + 3 + 4) / 3, 5.0, 6.0
    expected = (0.5 * mean_r + 2.0 * mean_f + 1.0 * mean_t) / (0.5 + 2.0 + 1.0)
    assert loss.item() == pytest.approx(expected) and part.item() == pytest.approx(expected)
    # plain text only: exactly the token mean; empty roles drop out of the weights
    t = torch.tensor([[3, 3, 0, 3]])
    assert L.Objective(L.role_counts(t), w)(nll[:, :4], t)[0].item() == pytest.approx((1 + 2 + 4) / 3)
    # float masks (plain GPTDataset) mean role 3
    assert L.roles_from_loss_mask(torch.tensor([1.0, 0.0])).tolist() == [3, 0]
    with pytest.raises(ValueError, match="roles must be in 0..3"):
        L.check_roles(torch.tensor([5], dtype=torch.uint8))
    # the collation checks every micro-batch on the host, before it reaches the step
    from megatron_vpmoe.training.batches import collate

    item = {"tokens": torch.zeros(3), "labels": torch.zeros(3), "loss_mask": torch.tensor([0, 2, 4], dtype=torch.uint8)}
    with pytest.raises(ValueError, match="roles must be in 0..3, got 0..4"):
        collate([item])


def test_objective_is_independent_of_micro_batch_split():
    torch.manual_seed(0)
    nll = torch.rand(4, 8, requires_grad=True)
    roles = torch.randint(0, 4, (4, 8))
    w = L.LossWeights(1.0, 1.0, 3.0)
    whole = L.Objective(L.role_counts(roles), w)(nll, roles)[0]
    (g_whole,) = torch.autograd.grad(whole, nll)
    obj = L.Objective(L.role_counts(roles), w)
    split = sum(obj(nll[i:i + 1], roles[i:i + 1])[0] for i in range(4))
    (g_split,) = torch.autograd.grad(split, nll)
    assert split.item() == pytest.approx(whole.item())
    assert torch.allclose(g_whole, g_split)


def test_bits_per_byte_uses_bytes_of_predicted_tokens():
    class Tok:
        def token_byte_lengths(self):
            return [1, 2, 3]  # "a", "é", "€"

    table = L.token_byte_lengths(Tok(), 5)
    assert table.tolist() == [1, 2, 3, 0, 0]
    labels, roles = torch.tensor([[0, 1, 2]]), torch.tensor([[3, 3, 0]])
    assert L.counted_bytes(labels, roles, table).item() == 3
    assert L.bits_per_byte(3 * math.log(2), 3) == pytest.approx(1.0)
    assert L.bits_per_byte(1.0, 0) is None


def _train_cfg(kind, warmup=10, steps=100):
    t = TrainConfig(steps=steps)
    t.optimizer.lr, t.optimizer.min_lr = 1.0, 0.1
    t.schedule.kind, t.schedule.warmup_steps, t.schedule.wsd_decay_fraction = kind, warmup, 0.2
    return t


def test_schedules():
    cos = _train_cfg("cosine")
    assert learning_rate(0, cos) == pytest.approx(0.1)  # warmup (step+1)/warmup
    assert learning_rate(9, cos) == pytest.approx(1.0)
    assert learning_rate(10, cos) == pytest.approx(1.0)
    assert learning_rate(55, cos) == pytest.approx(0.55)
    assert learning_rate(100, cos) == pytest.approx(0.1)
    wsd = _train_cfg("wsd")
    assert learning_rate(50, wsd) == 1.0 and learning_rate(79, wsd) == 1.0
    assert learning_rate(89, wsd) == pytest.approx(0.55)
    assert learning_rate(99, wsd) == pytest.approx(0.1)
    lrs = [learning_rate(s, wsd) for s in range(80, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    const = _train_cfg("constant", warmup=0)
    assert {learning_rate(s, const) for s in range(100)} == {1.0}


def test_optimizer_groups_and_clipping():
    from megatron_vpmoe.config import OptimizerConfig
    from megatron_vpmoe.training.optimizer import build_optimizer, clip_gradients, param_groups, set_learning_rate

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    cfg = OptimizerConfig(weight_decay=0.1, embedding_lr_mult=0.5)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["embedding"]["param_names"] == ["0.weight"] and groups["embedding"]["weight_decay"] == 0
    assert groups["norm_bias"]["param_names"] == ["1.weight", "1.bias", "2.bias"]
    assert groups["norm_bias"]["weight_decay"] == 0 and groups["weight"]["weight_decay"] == 0.1
    opt = build_optimizer(model, cfg)
    set_learning_rate(opt, 2.0)
    assert sorted(g["lr"] for g in opt.param_groups) == [1.0, 2.0, 2.0]
    decayed = param_groups(model, OptimizerConfig(decay_norms_and_biases=True, decay_embeddings=True))
    assert all(g["weight_decay"] == 0.1 for g in decayed)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    norm = clip_gradients(model.parameters(), 1.0)
    total = math.sqrt(sum(p.numel() for p in model.parameters())) * 10
    assert norm == pytest.approx(total, rel=1e-5)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_rank_discovery_for_each_launcher():
    assert discover_ranks({}).launcher == "single"
    r = discover_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (r.rank, r.world_size, r.local_rank, r.launcher) == (3, 8, 1, "torchrun")
    r = discover_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (r.rank, r.world_size, r.local_rank, r.launcher) == (5, 8, 1, "slurm")
    r = discover_ranks({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (r.rank, r.world_size, r.local_rank, r.launcher) == (2, 4, 0, "mpi")
    # torchrun's variables win when a wrapper exported them on top of SLURM's
    r = discover_ranks({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"})
    assert r.launcher == "torchrun"
    env = rendezvous_env(discover_ranks({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}),
                         {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "nodeA,nodeB"})
    assert env["MASTER_PORT"] == "21234" and env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    from megatron_vpmoe.utils.errors import VpmoeError

    with pytest.raises(VpmoeError, match="outside world size"):
        discover_ranks({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(VpmoeError, match="SLURM_NTASKS"):
        discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "x"})
    # torchrun --master-port 0 exports MASTER_PORT=0, on which the ranks would wait forever
    with pytest.raises(VpmoeError, match="MASTER_PORT=0"):
        rendezvous_env(discover_ranks({"RANK": "0", "WORLD_SIZE": "2"}), {"MASTER_PORT": "0"})


def test_global_batch_sampler_partitions_each_step():
    one = GlobalBatchSampler(100, 8, 2)
    two = [GlobalBatchSampler(100, 8, 2, r, 2) for r in range(2)]
    for step in (0, 5, 12):  # 12 wraps around the 100 samples
        flat1 = [i for mb in one.micro_batches(step) for i in mb]
        flat2 = [i for s in two for mb in s.micro_batches(step) for i in mb]
        assert flat1 == flat2 == [(step * 8 + k) % 100 for k in range(8)]
    assert one.accumulation_steps == 4 and two[0].accumulation_steps == 2


TEXT = "Héllo wörld — naïve café. " * 20 + "日本語のテキスト。"


def test_byte_lengths_of_hf_byte_level_bpe_match_utf8():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_vpmoe.tokenizers.base import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    ours = HFTokenizer("bpe", "t", tok, eod_token="<|endoftext|>")
    table = L.token_byte_lengths(ours, 320)  # the tokenizer's own table, padded to the embedding
    ids = torch.tensor([ours.encode(TEXT)])
    assert int(table[ids].sum()) == len(TEXT.encode("utf-8"))
    assert table[tok.token_to_id("<|endoftext|>")] == 0 and table[310] == 0


def test_trainer_logs_the_role_weighted_objective(tmp_path):
    from helpers.train_support import SHAKESPEARE, ByteTokenizer, ByteWindows, read_metrics, tiny_config

    from megatron_vpmoe.training.trainer import Trainer

    seq = 32
    roles = [[3] * seq, [0] * 8 + [1] * 16 + [2] * 8, [0] * 20 + [2] * 12, [1] * 30 + [0] * 2]
    cfg = tiny_config(tmp_path, train={"steps": 2}, distill={"reasoning_loss_weight": 0.5,
                                                             "final_loss_weight": 2.0})
    data = ByteWindows(SHAKESPEARE, seq, limit=20_000, roles=roles)
    assert Trainer(cfg, datasets=(data, data), tokenizer=ByteTokenizer(), quiet=True).run() == 0
    for r in read_metrics(tmp_path):
        expected = (r["nll_text"] + 0.5 * r["nll_reasoning"] + 2.0 * r["nll_final"]) / 3.5
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["loss_tokens"] == 4 * seq - 8 - 20 - 2
        bpb = (r["nll_text"] * seq + r["nll_reasoning"] * 46 + r["nll_final"] * 20) / math.log(2) / 98
        assert r["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)


def test_validation_counts_only_loss_positions(tmp_path):
    from helpers.train_support import SHAKESPEARE, ByteTokenizer, ByteWindows, tiny_config

    from megatron_vpmoe.training.trainer import Trainer

    seq = 32
    cfg = tiny_config(tmp_path, train={"steps": 2, "eval_iters": 1})
    half = ByteWindows(SHAKESPEARE, seq, limit=20_000, roles=[[0] * 16 + [3] * 16])
    full = ByteWindows(SHAKESPEARE, seq, limit=20_000)
    trainer = Trainer(cfg, datasets=(full, full), tokenizer=ByteTokenizer(), quiet=True)
    trainer.byte_lengths = torch.ones(256, dtype=torch.long)
    a, b = trainer.evaluate(half), trainer.evaluate(full)
    assert a["loss"] == pytest.approx(a["lm_loss"]) and b["loss"] == pytest.approx(b["lm_loss"])
    assert a["bits_per_byte"] == pytest.approx(a["lm_loss"] / math.log(2))
    # the second halves alone, computed directly
    batch = [half[i] for i in range(4)]
    with torch.no_grad():
        nll = trainer.raw_model(torch.stack([x["tokens"] for x in batch]),
                                labels=torch.stack([x["labels"] for x in batch]))
    assert a["loss"] == pytest.approx(float(nll[:, 16:].mean()), rel=1e-5)


def test_flops_per_token_and_peak_override(monkeypatch):
    from dataclasses import replace

    from megatron_vpmoe.config import ModelConfig
    from megatron_vpmoe.plan.flops import training_flops_per_token
    from megatron_vpmoe.training.metrics import flops_per_token, peak_flops_per_device

    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                      window_size=8, local_global_pattern=[3, 1], num_moe_experts=8, moe_router_num_groups=1,
                      moe_router_group_topk=1, moe_router_topk=2, vocab_size=100)
    assert flops_per_token(cfg, 32) == training_flops_per_token(cfg, 32)  # one formula: the planner's
    untied = replace(cfg, untie_embeddings_and_output_weights=True)
    # untying adds a head matrix of V x H parameters, but only the head is a matmul: +6 V H, not +12
    assert flops_per_token(untied, 32) == flops_per_token(cfg, 32)
    monkeypatch.setenv("VPMOE_PEAK_FLOPS", "1e12")
    assert peak_flops_per_device() == 1e12


def test_router_entropy_is_read_at_log_steps_and_reset():
    """The routers sum each training token's normalised score entropy on device; the metric divides
    by ln(experts) (1 = uniform routing), resets the sums, and ignores validation forwards."""
    from megatron_vpmoe.config.schema import ModelConfig
    from megatron_vpmoe.model.moe import Router
    from megatron_vpmoe.training.metrics import router_entropy_stats

    cfg = ModelConfig(hidden_size=8, num_moe_experts=4, moe_router_topk=2, moe_router_score_function="softmax",
                      moe_router_num_groups=1, moe_router_group_topk=1)
    model = torch.nn.ModuleDict({"a": Router(cfg), "b": Router(cfg)})
    torch.nn.init.zeros_(model["a"].weight)  # equal scores: uniform
    with torch.no_grad():
        model["b"].weight.copy_(torch.tensor([[50.0] * 8, [0.0] * 8, [0.0] * 8, [0.0] * 8]))
    x = torch.ones(6, 8)
    model["a"](x), model["b"](x)
    a, b = router_entropy_stats(model)["router_entropy"]
    assert a == pytest.approx(1.0, abs=1e-5) and b < 0.01  # one expert takes all the score
    assert router_entropy_stats(model) == {}  # read and reset
    model.train(False)
    model["a"](x)
    assert router_entropy_stats(model) == {}  # validation is not training's routing


def test_profile_steps_write_a_table_and_a_trace_for_the_window(tmp_path):
    from helpers.train_support import ByteTokenizer, datasets_for, read_metrics, tiny_config

    from megatron_vpmoe.training.trainer import Trainer

    cfg = tiny_config(tmp_path, train={"steps": 3}, log={"profile_steps": [2, 3]})
    assert Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True).run() == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    table = (tmp_path / "profile" / "rank_0.txt").read_text()
    assert table.startswith("steps 2..3 (2 steps), sorted by self_")
    assert "aten::mm" in table and "Self CPU time total" in table
    trace = json.loads((tmp_path / "profile" / "rank_0.json").read_text())
    # the optimizer ran inside the window twice (steps 2 and 3), and never outside it
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert sum(n.startswith("Optimizer.step#") for n in names) == 2


@pytest.mark.parametrize("window", [[0, 1], [2, 1], [1, 4], [1]])
def test_profile_steps_out_of_range_name_the_key(tmp_path, window):
    from helpers.train_support import tiny_config

    from megatron_vpmoe.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"log\.profile_steps"):
        tiny_config(tmp_path, train={"steps": 3}, log={"profile_steps": window})
