"""On-policy distillation on the parallel engine: the first step's policy loss and gradients
under EP=2, PP=2 and DP=2 with ZeRO-2 match one process within 1e-5 on fixed completions and scores;
rollouts run in lockstep under EP (and stage to stage under PP) and give the single-process
samples; a resumed run continues bit for bit."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from helpers.distributed import full_gradient, run_distributed

VOCAB = 96
EOS = 1


class ByteTokenizer:
    """A tiny tokenizer for tests: UTF-8 bytes folded into the model's vocabulary."""

    unk_token_id = None
    eos_token_id = EOS
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False, split_special_tokens=False):
        return [2 + b % (VOCAB - 2) for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)

    def convert_tokens_to_ids(self, token):
        return None


async def _stub_scores(cfg_onpolicy, url, groups, template, model=None):
    """Deterministic scores from the completion strings (the same whatever the layout)."""
    scores = [[int(hashlib.md5(t.encode()).hexdigest()[:4], 16) / 65535.0 for t in texts]
              for _m, _r, texts in groups]
    return scores, {}


def _fixed_completions(rows):
    """The j-th copy of a prompt gets completion j (lengths differ), independent of the layout."""
    out, seen = [], {}
    for p in rows:
        j = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
        out.append([2 + (sum(p) * 7 + j * 13 + t * 5) % (VOCAB - 2) for t in range(3 + 2 * j)])
    return out


def _write_atomically(path, text):
    """Every rank writes the same file: each writes its own temporary and renames it, so no rank
    ever reads another's half-written copy."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_config(tmp, name, *, steps=1, ppo_epochs=1, parallel="{}", extra=""):
    prompts = tmp / "prompts.jsonl"
    _write_atomically(prompts, "".join(f'{{"prompt": "What is {i} plus {i * 3}?"}}\n' for i in range(8)))
    path = tmp / f"{name}.yaml"
    _write_atomically(path, f"""
run: {{dir: {tmp}/{name}, seed: 3}}
model: {{vocab_size: {VOCAB}, hidden_size: 32, num_layers: 2, num_attention_heads: 4,
  num_query_groups: 2, kv_channels: 8, ffn_hidden_size: 64, window_size: 8, moe_first_k_dense: 1,
  num_moe_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 32,
  moe_shared_expert_intermediate_size: 32, moe_router_num_groups: 1, moe_router_group_topk: 1,
  untie_embeddings_and_output_weights: true}}
data: {{mock: true, seq_length: 32}}
parallel: {parallel}
train: {{steps: {steps}, global_batch_size: 4, micro_batch_size: 4,
  optimizer: {{lr: 0.01, min_lr: 0.01}}, schedule: {{kind: constant}}}}
checkpoint: {{dir: {tmp}/{name}/ckpt, keep_last: 2}}
log: {{progress_bar: false}}
distill:
  teacher_url: http://127.0.0.1:9
  onpolicy: {{prompts: [{prompts}], samples_per_prompt: 3, prompts_per_step: 2, max_new_tokens: 6,
    ppo_epochs: {ppo_epochs}, kl_coeff: 0.1, sample_table_interval: 0 {extra}}}
""")
    return str(path)


def _trainer(cfg_path, fixed: bool):
    import megatron_vpmoe.distill.onpolicy as onpolicy
    from megatron_vpmoe.config import load_config

    onpolicy.score_groups = _stub_scores  # no teacher server: scores from the strings
    onpolicy.check_teacher = lambda cfg, quiet=False: None  # and no probe of one
    trainer = onpolicy.OnPolicyTrainer(load_config(cfg_path), quiet=True, tokenizer=ByteTokenizer())
    if fixed:
        trainer._generate = _fixed_completions
    return trainer


def _first_step(rank, world_size, cfg_path):
    """The first step on fixed completions: its loss (of the second PPO epoch: in the first the
    ratio is 1 and the student is the reference, so the loss is ~0), the global grad norm and
    both epochs' full (unsharded) gradients of this rank's parameters (their shards gathered)."""
    trainer = _trainer(cfg_path, fixed=True)
    pm, grads = trainer.pm, {}
    step = trainer.optimizer.step

    def capture():
        for name, p in pm.named_parameters():
            grad = full_gradient(pm, trainer.optimizer, p)  # ZeRO-2: the parts put together
            full = pm.as_sharded(name, grad)  # a DTensor over its TP/EP group, gathered whole
            full = full.full_tensor() if hasattr(full, "full_tensor") else full
            grads[name] = grads.get(name, []) + [full.numpy().copy()]
        step()

    trainer.optimizer.step = capture
    record = trainer.train_step()
    return record["policy_loss"], record["grad_norm"], record["kl"], grads


def _rollouts(rank, world_size, layout):
    """Greedy and sampled rollouts through the engine (ranks hold different prompts under EP, so
    they decode for different lengths) against ``model.generation.generate`` on the full model."""
    from megatron_vpmoe.config.schema import ModelConfig, ParallelConfig
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.model.generation import generate as reference_generate
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.generation import generate

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, kv_channels=8, ffn_hidden_size=64, window_size=4,
                      moe_first_k_dense=1, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                      moe_shared_expert_intermediate_size=32, moe_router_num_groups=1,
                      moe_router_group_topk=1, untie_embeddings_and_output_weights=True)
    ctx = init_parallel(ParallelConfig(**layout))
    pm = build_parallel_model(cfg, ctx, seed=5)
    torch.manual_seed(5)
    full = VpmoeModel(cfg)
    # EP ranks are different replicas: rank 1 has one more length group and longer prompts
    who = ctx.dp_rank
    prompts = [[3, 4, 5], [7, 8, 9], [10, 11]] + ([[12, 13, 14, 15, 16, 17]] if who else [])
    free = reference_generate(full, prompts, 8)
    eos = free[0][1] if who == 0 else None  # rank 0's first row stops early, rank 1 runs on
    out = []
    for temperature in (0.0, 1.0):
        want = reference_generate(full, prompts, 8, temperature=temperature, eos_id=eos,
                                  generator=torch.Generator().manual_seed(11))
        got = generate(pm, prompts, 8, temperature=temperature, eos_id=eos,
                       generator=torch.Generator().manual_seed(11))
        out.append((got, want))
    return out


def _layout_worker(rank, world_size, cfg_path, layout):
    return _first_step(rank, world_size, cfg_path), _rollouts(rank, world_size, layout)


@pytest.mark.parametrize("layout", [{"expert": 2}, {"pipeline": 2}, {"distributed_optimizer": True}],
                         ids=["ep2", "pp2", "dp2-zero2"])
def test_layout_matches_one_process(tmp_path, layout, monkeypatch):
    """In one 2-process run: the first step's update equals one process's, and the rollouts
    (in lockstep under EP, stage to stage under PP) equal one process's samples."""
    import megatron_vpmoe.distill.onpolicy as onpolicy

    monkeypatch.setattr(onpolicy, "score_groups", _stub_scores)  # restored after the test
    base_loss, base_norm, base_kl, base = _first_step(0, 1, _write_config(tmp_path, "single", ppo_epochs=2))
    assert abs(base_loss) > 1e-4 and base_norm > 0  # a real update (advantages, not just KL)
    cfg = _write_config(tmp_path, "par", ppo_epochs=2, parallel=json.dumps(layout))
    results = run_distributed(_layout_worker, 2, cfg, layout)
    merged = {}
    for (loss, norm, kl, grads), _ in results:
        assert abs(loss - base_loss) < 1e-5 and abs(norm - base_norm) < 1e-5 and abs(kl - base_kl) < 1e-6
        merged.update(grads)
    assert sorted(merged) == sorted(base)
    for name, per_epoch in base.items():
        assert len(per_epoch) == len(merged[name]) == 2
        for g, m in zip(per_epoch, merged[name]):
            diff = float(abs(torch.from_numpy(m) - torch.from_numpy(g)).max())
            assert diff < 1e-5, (name, diff)
    for _, rollouts in results:
        for got, want in rollouts:  # greedy, then sampled
            assert got == want
    assert len(results[0][1][0][0][0]) < 8  # eos stopped a row early while other rows kept decoding


def _resume(rank, world_size, tmp):
    """Two steps straight vs one step, a checkpoint, and a resumed second step (real rollouts)."""
    from pathlib import Path

    tmp = Path(tmp)
    straight = _trainer(_write_config(tmp, "straight", steps=2, ppo_epochs=2,
                                      parallel="{pipeline: 2}"), fixed=False)
    straight.run()
    first = _trainer(_write_config(tmp, "resumed", steps=1, ppo_epochs=2, parallel="{pipeline: 2}"),
                     fixed=False)
    first.run()
    again = _trainer(_write_config(tmp, "resumed", steps=2, ppo_epochs=2, parallel="{pipeline: 2}"),
                     fixed=False)
    assert again.step == 1
    again.run()
    a = {k: v.clone() for k, v in straight.pm.module.state_dict().items()}
    b = again.pm.module.state_dict()
    return all(torch.equal(a[k], b[k]) for k in a), again._last[1] == straight._last[1]


def test_resume_is_exact_under_pipeline(tmp_path):
    results = run_distributed(_resume, 2, str(tmp_path))
    assert results == [(True, True), (True, True)]
