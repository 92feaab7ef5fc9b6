"""On-policy distillation (``vpmoe distill onpolicy --config X.yaml``): GRPO-style updates of the
student from string-level teacher scores.

One step: take ``prompts_per_step`` prompts; sample ``samples_per_prompt`` completions each from
the current student (KV-cache generation, its own tokenizer); record the sampled tokens'
log-probs under the sampling policy (old) and the frozen reference; decode to text and have the
served teacher score the strings (:mod:`scorers`, weighted); turn each group's scores into
group-relative advantages; then ``ppo_epochs`` passes of the clipped policy gradient + k3 KL to
the reference (+ optional NLL anchor on the phase-1 corpus).

The reference is ``distill.onpolicy.reference`` (a checkpoint, normally the phase-1 student)
or, when unset, the student's weights at the start of the run. Checkpoints (model, optimizer,
step, RNG) use the trainer's :class:`CheckpointManager`, so a run resumes from
``checkpoint.dir``. Metrics go to ``{run.dir}/metrics.jsonl`` (mean teacher score, reward
spread, KL, response length, samples/s, dropped samples) and a sample table of prompts,
completions and scores to ``{run.dir}/samples.jsonl`` every ``sample_table_interval`` steps.
Data parallel like ``vpmoe train`` (torchrun / SLURM / mpirun, gloo or NCCL): each rank takes its
share of the step's prompts, samples and asks the teacher on its own, and the gradients are
averaged over ranks (one flat all-reduce per update); metrics are reduced over ranks and written by rank 0. No tensor/expert/pipeline split.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from pathlib import Path
from typing import Optional

from megatron_vpmoe.distill.policy_loss import group_advantages, policy_loss
from megatron_vpmoe.distill.prompts import load_prompts
from megatron_vpmoe.distill.scorers import SCORERS, combine
from megatron_vpmoe.utils.errors import ConfigError


def student_prompt(messages: list, harmony: bool) -> str:
    if harmony:
        from megatron_vpmoe.serve.chat_format import render_harmony_prompt

        return render_harmony_prompt(messages)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def student_answer(text: str, harmony: bool) -> str:
    """The part of a student completion the teacher judges (the final channel for Harmony)."""
    if harmony:
        from megatron_vpmoe.serve.chat_format import parse_harmony_completion

        return parse_harmony_completion(text).final
    return text


async def score_groups(cfg_onpolicy, teacher_url: str, groups: list, teacher_template: str,
                       model: Optional[str] = None) -> tuple[list, dict]:
    """``groups``: [(messages, reference, [completion texts])] -> combined scores per group and
    the per-scorer means (for logging)."""
    from megatron_vpmoe.distill.teacher_client import TeacherClient

    kinds = [s.kind for s in cfg_onpolicy.scorers]
    weights = [s.weight for s in cfg_onpolicy.scorers]
    async with TeacherClient(teacher_url, timeout_s=cfg_onpolicy.teacher_timeout_s,
                             retries=cfg_onpolicy.teacher_retries, concurrency=16) as client:
        async def one_group(messages, reference, texts):
            per_scorer = await asyncio.gather(*(
                SCORERS[k](client, messages, reference, texts, template=teacher_template, model=model)
                for k in kinds))
            return per_scorer, combine(list(per_scorer), weights, len(texts))

        results = await asyncio.gather(*(one_group(*g) for g in groups))
    by_kind = {}
    for i, kind in enumerate(kinds):
        vals = [v for per, _ in results if isinstance(per[i], list) for v in per[i] if v is not None]
        if vals:
            by_kind[f"score_{kind}"] = sum(vals) / len(vals)
    return [combined for _, combined in results], by_kind


class OnPolicyTrainer:
    def __init__(self, cfg, *, quiet: bool = False, anchor_dataset=None):
        """``anchor_dataset``: items ``{tokens, labels, loss_mask}`` for the NLL anchor (default:
        the ``data.blend`` shards through the data package) - used when ``nll_anchor_coeff > 0``."""
        import torch

        self.cfg = cfg
        op = cfg.distill.onpolicy
        if not cfg.distill.teacher_url:
            raise ConfigError("on-policy distillation needs a teacher server", key="distill.teacher_url")
        if not op.prompts:
            raise ConfigError("give prompt files (jsonl)", key="distill.onpolicy.prompts")
        if not cfg.data.tokenizer:
            raise ConfigError("the student's tokenizer directory is needed", key="data.tokenizer")
        if op.samples_per_prompt < 2:
            raise ConfigError("group-relative advantages need >= 2 samples",
                              key="distill.onpolicy.samples_per_prompt")
        for i, s in enumerate(op.scorers):
            if s.kind not in SCORERS:
                raise ConfigError(f"unknown scorer {s.kind!r}", key=f"distill.onpolicy.scorers[{i}].kind")
        self.quiet = quiet
        from megatron_vpmoe.training.distributed import init_distributed

        info = init_distributed()
        self.rank, self.world_size = info.rank, info.world_size
        if cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.expert > 1:
            raise ConfigError("on-policy distillation runs data parallel only; set parallel.tensor, "
                              "pipeline and expert to 1", key="parallel")
        if cfg.parallel.distributed_optimizer:
            raise ConfigError("on-policy distillation keeps the full optimizer on every rank; set it "
                              "to false", key="parallel.distributed_optimizer")
        cfg.parallel.resolve_data(self.world_size)
        if op.prompts_per_step % self.world_size:
            raise ConfigError(f"must be divisible by the data-parallel size ({self.world_size})",
                              key="distill.onpolicy.prompts_per_step")
        if op.nll_anchor_coeff < 0:
            raise ConfigError("must be >= 0", key="distill.onpolicy.nll_anchor_coeff")
        self.prompts = load_prompts(op.prompts)
        from megatron_vpmoe.serve.backends import load_tokenizer_dir

        self.tok = load_tokenizer_dir(cfg.data.tokenizer)
        specials = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")
        unk = self.tok.unk_token_id
        self.harmony = all(self.tok.convert_tokens_to_ids(t) not in (None, unk) for t in specials)
        stops = ["<|return|>"] if self.harmony else []
        stop_ids = [self.tok.convert_tokens_to_ids(t) for t in stops]
        eos = stop_ids[0] if stop_ids else self.tok.eos_token_id
        self.eos_id = eos
        torch.manual_seed(cfg.run.seed)
        from megatron_vpmoe.model import VpmoeModel
        from megatron_vpmoe.training.checkpoint import CheckpointManager, latest_checkpoint
        from megatron_vpmoe.training.optimizer import build_optimizer

        self.model = VpmoeModel(cfg.model)  # the plain module (generation, checkpoints)
        self.optimizer = build_optimizer(self.model, cfg.train.optimizer)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last)
        self.step = 0
        load = cfg.checkpoint.load
        # this run's own latest checkpoint wins (resume); else ``checkpoint.load`` names the
        # phase-1 student to start from
        resume = latest_checkpoint(cfg.checkpoint_dir) if load is not None else None
        if resume is not None:  # our own run: model, optimizer, step, RNG
            state = self.ckpt.load(resume, self.model, self.optimizer)
            self.step = int(state["step"])
        elif load not in (None, "auto"):  # the phase-1 student: weights only
            self._load_weights(self.model, load)
        self.reference = copy.deepcopy(self.model)
        if op.reference:
            self._load_weights(self.reference, op.reference)
        elif resume is not None:
            ref_path = Path(cfg.checkpoint_dir) / "reference.pt"
            self.reference.load_state_dict(torch.load(ref_path, weights_only=True))
        self.reference.eval().requires_grad_(False)
        if resume is None and not op.reference and self.rank == 0:
            from megatron_vpmoe.utils.atomic import atomic_file

            with atomic_file(Path(cfg.checkpoint_dir) / "reference.pt", "wb") as f:
                torch.save(self.reference.state_dict(), f)
        if self.world_size > 1:  # every rank starts from rank 0's weights
            import torch.distributed as dist

            for t in self.model.state_dict().values():
                dist.broadcast(t, src=0)
        self.anchor = None
        if op.nll_anchor_coeff > 0:
            self.anchor = anchor_dataset if anchor_dataset is not None else self._phase1_dataset()
            from megatron_vpmoe.training.batches import GlobalBatchSampler

            self.anchor_sampler = GlobalBatchSampler(
                len(self.anchor), cfg.train.micro_batch_size * self.world_size,
                cfg.train.micro_batch_size, self.rank, self.world_size)

    @staticmethod
    def _load_weights(model, path: str) -> None:
        from megatron_vpmoe.training.checkpoint import load_model_state_dict

        model.load_state_dict(load_model_state_dict(path))

    def _phase1_dataset(self):
        try:
            from megatron_vpmoe.data.dataset import build_datasets
        except ImportError as err:
            raise ConfigError(f"the NLL anchor reads data.blend through megatron_vpmoe.data.dataset, "
                              f"which is not available ({err})",
                              key="distill.onpolicy.nll_anchor_coeff") from None
        cfg = self.cfg
        train, _valid, _test = build_datasets(
            cfg.data, seed=cfg.run.seed, num_samples=cfg.train.steps * cfg.train.micro_batch_size
            * self.world_size, eod_id=self.tok.eos_token_id or 0,
            pad_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0),
            cache_dir=cfg.data.cache_dir or str(Path(cfg.run.dir) / "data_cache"))
        return train

    def _anchor_loss(self):
        """Role-aware NLL (the trainer's objective: span-normalised assistant spans, plain text)
        on this rank's micro-batch of phase-1 data for the current step."""
        from megatron_vpmoe.training.batches import collate
        from megatron_vpmoe.training.loss import (
            LossWeights, role_coefficients, role_counts, roles_from_loss_mask)

        idx = self.anchor_sampler.micro_batches(self.step)[0]
        mb = collate([self.anchor[i] for i in idx])
        roles = roles_from_loss_mask(mb["loss_mask"])
        coef = role_coefficients(role_counts(roles), LossWeights.from_config(self.cfg.distill))
        labels = mb["labels"].masked_fill(roles == 0, -100)
        per_token = self.model(mb["tokens"], labels=labels)
        return (per_token.double() * coef[roles]).sum().float()

    def _average_gradients(self) -> None:
        if self.world_size == 1:
            return
        import torch
        import torch.distributed as dist

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()

    # one step -----------------------------------------------------------------------------
    def _rollouts(self, batch):
        import torch

        from megatron_vpmoe.model.generation import generate, sequence_logprobs

        op = self.cfg.distill.onpolicy
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + self.step)
        prompt_ids = [self.tok.encode(student_prompt(p.messages, self.harmony), add_special_tokens=False)
                      for p in batch]
        rows = [ids for ids in prompt_ids for _ in range(op.samples_per_prompt)]
        outs = generate(self.model, rows, op.max_new_tokens, temperature=op.temperature,
                        top_p=op.top_p, eos_id=self.eos_id, generator=gen)
        outs = [o if o else [self.eos_id] for o in outs]  # at least one token to score
        seqs = [p + o for p, o in zip(rows, outs)]
        starts = [len(p) for p in rows]
        old = sequence_logprobs(self.model, seqs, starts)
        ref = sequence_logprobs(self.reference, seqs, starts)
        texts = [self.tok.decode([t for t in o if t != self.eos_id], skip_special_tokens=False)
                 for o in outs]
        return seqs, starts, old, ref, texts

    def _pad(self, seqs, starts, *values):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width - 1)
        out = [torch.zeros(len(seqs), width - 1) for _ in values]
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, st - 1: len(s) - 1] = 1
            for v, t in zip(values, out):
                t[i, st - 1: len(s) - 1] = torch.tensor(v[i])
        return ids, mask, out

    def train_step(self) -> dict:
        import torch

        from megatron_vpmoe.training.optimizer import clip_gradients, set_learning_rate
        from megatron_vpmoe.training.schedule import learning_rate

        cfg, op = self.cfg, self.cfg.distill.onpolicy
        t0 = time.perf_counter()
        n = len(self.prompts)
        per_rank = op.prompts_per_step // self.world_size
        first = self.step * op.prompts_per_step + self.rank * per_rank
        batch = [self.prompts[(first + i) % n] for i in range(per_rank)]
        seqs, starts, old, ref, texts = self._rollouts(batch)
        k = op.samples_per_prompt
        groups = [(p.messages, p.reference,
                   [student_answer(t, self.harmony) for t in texts[g * k:(g + 1) * k]])
                  for g, p in enumerate(batch)]
        scores, by_kind = asyncio.run(score_groups(op, cfg.distill.teacher_url, groups,
                                                   op.teacher_prompt))
        adv = [a for group in scores for a in group_advantages(group)]
        keep = [i for i, a in enumerate(adv) if a is not None]
        dropped = len(adv) - len(keep)
        stats = {"pg": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        grad_norm = 0.0
        # every rank runs the update (gradients are averaged over ranks); a rank whose samples
        # were all dropped contributes a zero policy loss over its rows
        rows = keep or list(range(len(adv)))
        ids, mask, (old_t, ref_t) = self._pad([seqs[i] for i in rows], [starts[i] for i in rows],
                                              [old[i] for i in rows], [ref[i] for i in rows])
        advantages = torch.tensor([adv[i] if adv[i] is not None else 0.0 for i in rows])
        set_learning_rate(self.optimizer, learning_rate(self.step, cfg.train))
        self.model.train()
        for _ in range(max(1, op.ppo_epochs)):
            logits = self.model(ids[:, :-1]).float()
            new = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            loss, stats = policy_loss(new, old_t, ref_t, advantages, mask,
                                      clip_eps=op.clip_eps, kl_coeff=op.kl_coeff)
            total = loss if keep else loss * 0.0
            if self.anchor is not None:
                anchor = self._anchor_loss()
                stats["anchor_nll"] = float(anchor.detach())
                total = total + op.nll_anchor_coeff * anchor
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self._average_gradients()
            grad_norm = clip_gradients(self.model.parameters(), cfg.train.optimizer.clip_grad)
            if math.isfinite(grad_norm):
                self.optimizer.step()
        self.step += 1
        valid = [s for group in scores for s in group if s is not None]
        spreads = [_std([s for s in g if s is not None]) for g in scores]
        has = 1.0 if keep else 0.0
        totals = self._all_reduce([
            sum(valid), len(valid), sum(spreads), len(spreads), has * stats["kl"],
            has * stats["pg"], has * stats["clip_fraction"], has, dropped,
            sum(len(s) - st for s, st in zip(seqs, starts)), len(seqs)])
        (score_sum, n_valid, spread_sum, n_groups, kl_sum, pg_sum, clip_sum, n_upd, dropped_all,
         resp_tokens, n_seqs) = totals
        secs = time.perf_counter() - t0
        record = {"step": self.step, "kind": "onpolicy",
                  "teacher_score": score_sum / n_valid if n_valid else float("nan"),
                  "reward_spread": spread_sum / max(n_groups, 1), "kl": kl_sum / max(n_upd, 1),
                  "pg": pg_sum / max(n_upd, 1), "clip_fraction": clip_sum / max(n_upd, 1),
                  "grad_norm": grad_norm, "response_tokens": resp_tokens / n_seqs,
                  "samples_per_s": n_seqs / secs, "dropped": int(dropped_all), **by_kind}
        if "anchor_nll" in stats:
            record["anchor_nll"] = self._all_reduce([stats["anchor_nll"]])[0] / self.world_size
        self._last = (batch, texts, scores)
        return record

    def _all_reduce(self, values: list) -> list:
        """Sums over data-parallel ranks (the values themselves in one process)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def _sample_table(self) -> list:
        batch, texts, scores = self._last
        k = self.cfg.distill.onpolicy.samples_per_prompt
        return [{"step": self.step, "prompt_id": p.id, "prompt": p.messages[-1]["content"],
                 "completion": texts[g * k + j], "score": scores[g][j]}
                for g, p in enumerate(batch) for j in range(k)]

    def run(self) -> list:
        from tqdm import tqdm

        from megatron_vpmoe.config import dump_config
        from megatron_vpmoe.training.metrics import MetricsLogger

        cfg, op = self.cfg, self.cfg.distill.onpolicy
        run_dir = Path(cfg.run.dir)
        main = self.rank == 0
        logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.log.tensorboard,
                               resume_step=self.step)
        history = []
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="on-policy", unit="step",
                   disable=None if cfg.log.progress_bar and not self.quiet and main else True)
        while self.step < cfg.train.steps:
            record = self.train_step()
            history.append(record)
            logger.log(record)
            bar.update(1)
            bar.set_postfix(score=f"{record['teacher_score']:.3f}", kl=f"{record['kl']:.4f}")
            if main and op.sample_table_interval and self.step % op.sample_table_interval == 0:
                with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                    for row in self._sample_table():
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            last = self.step == cfg.train.steps
            if last or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                self.ckpt.save(self.step, self.model, self.optimizer, {"kind": "onpolicy"},
                               config_text=dump_config(cfg))
        bar.close()
        return history


def _std(xs: list) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
