"""On-policy distillation (``vpmoe distill onpolicy --config X.yaml``): GRPO-style updates of the
student from string-level teacher scores, on the parallel engine.

One step: take ``prompts_per_step`` prompts; sample ``samples_per_prompt`` completions each from
the current student (KV-cache generation through the engine, :mod:`megatron_vpmoe.parallel.generation`,
its own tokenizer); record the sampled tokens' log-probs under the sampling policy (old) and the
frozen reference (``forward_only`` through the engine); decode to text and have the served
teacher score the strings (:mod:`scorers`, weighted); turn each group's scores into
group-relative advantages; then ``ppo_epochs`` passes of the clipped policy gradient + k3 KL to
the reference (+ optional NLL anchor on the phase-1 corpus), each one
``ParallelModel.forward_backward`` with the loss hook below: the engine reduces the gradients
over the layout and ``grad_norm()`` is the global norm.

Any layout of ``vpmoe train`` (TP/EP/PP/DP; torchrun / SLURM / mpirun, gloo or NCCL; the model
on the rank's device): each data-parallel replica takes its share of the step's prompts;
the ranks of one replica (TP/PP peers) sample the same completions, one of them asks the
teacher and broadcasts the scores. The policy loss is normalised by the global number of
scored samples, so every layout computes the same loss and gradients. Metrics are reduced over
the data-parallel replicas and written by rank 0.

The reference is ``distill.onpolicy.reference`` (a checkpoint, normally the phase-1 student)
or, when unset, the student's weights at the start of the run (``checkpoint.load``'s weights,
else the seed's initialisation); it is a second engine model of the same layout, rebuilt the
same way on resume. Checkpoints (model, optimizer, step, RNG) use the trainer's
:class:`CheckpointManager`, so a run resumes from ``checkpoint.dir`` (in any layout). Metrics go
to ``{run.dir}/metrics.jsonl`` (mean teacher score, reward spread, policy loss, KL, response
length, samples/s, dropped samples) and a sample table of prompts, completions and scores to
``{run.dir}/samples.jsonl`` every ``sample_table_interval`` steps.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Optional

from megatron_vpmoe.distill.policy_loss import group_advantages
from megatron_vpmoe.distill.prompts import load_prompts
from megatron_vpmoe.distill.scorers import SCORERS, combine, teacher_tokenizer
from megatron_vpmoe.distill.teacher_client import check_teacher_url
from megatron_vpmoe.training.step_stats import Fields
from megatron_vpmoe.utils.errors import ConfigError, InputError

# one micro-batch's update statistics from the loss hook, summed over micro-batches and ranks: the
# policy loss, the weighted pg and kl terms, clipped and all response tokens, the anchor's NLL part
POLICY_STATS = Fields(policy_loss=1, pg=1, kl=1, clipped=1, tokens=1, anchor_nll=1)


def student_prompt(messages: list, harmony: bool) -> str:
    if harmony:
        from megatron_vpmoe.data.chat_format import render_harmony_prompt

        return render_harmony_prompt(messages)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def student_prompt_ids(tokenizer, messages: list, harmony: bool) -> list:
    """The student's prompt ids: :func:`student_prompt` with message contents encoded as plain
    text (special-token strings in a prompt never become turn markers)."""
    from megatron_vpmoe.data.chat import encode_pieces, render_pieces

    return encode_pieces(tokenizer, render_pieces(lambda msgs: student_prompt(msgs, harmony), messages))


def student_answer(text: str, harmony: bool) -> str:
    """The part of a student completion the teacher judges (the final channel for Harmony)."""
    if harmony:
        from megatron_vpmoe.data.chat_format import parse_harmony_completion

        return parse_harmony_completion(text).final
    return text


async def score_groups(cfg_onpolicy, teacher_url: str, groups: list, teacher_template: str,
                       model: Optional[str] = None) -> tuple[list, dict]:
    """``groups``: [(messages, reference, [completion texts])] -> combined scores per group and
    the per-scorer means (for logging)."""
    from megatron_vpmoe.distill.teacher_client import TeacherClient

    kinds = [s.kind for s in cfg_onpolicy.scorers]
    tokenizer = teacher_tokenizer(teacher_template, cfg_onpolicy.teacher_tokenizer) if "loglik" in kinds else None
    weights = [s.weight for s in cfg_onpolicy.scorers]
    async with TeacherClient(teacher_url, timeout_s=cfg_onpolicy.teacher_timeout_s,
                             retries=cfg_onpolicy.teacher_retries, concurrency=16) as client:
        async def one_group(messages, reference, texts):
            per_scorer = await asyncio.gather(*(
                SCORERS[k](client, messages, reference, texts, template=teacher_template, model=model,
                           tokenizer=tokenizer)
                for k in kinds))
            return per_scorer, combine(list(per_scorer), weights, len(texts))

        results = await asyncio.gather(*(one_group(*g) for g in groups))
    by_kind = {}
    for i, kind in enumerate(kinds):
        vals = [v for per, _ in results if isinstance(per[i], list) for v in per[i] if v is not None]
        if vals:
            by_kind[f"score_{kind}"] = sum(vals) / len(vals)
    return [combined for _, combined in results], by_kind


def check_teacher(cfg, *, quiet: bool = False):
    """Probe the teacher for the configured scorers' features; say in one line what it supports;
    refuse (exit 2) a scorer it cannot serve (:mod:`megatron_vpmoe.distill.teacher_probe`)."""
    import sys

    from megatron_vpmoe.distill.teacher_probe import SCORER_FEATURES, probe_teacher, require

    kinds = [s.kind for s in cfg.distill.onpolicy.scorers]
    caps = probe_teacher(cfg.distill.teacher_url, SCORER_FEATURES,
                         timeout_s=cfg.distill.onpolicy.teacher_timeout_s)
    if not quiet:
        print(caps.line(), file=sys.stderr, flush=True)
    require(caps, kinds)
    if "loglik" in kinds:
        _check_loglik_ids(cfg, caps.model)
    return caps


def _check_loglik_ids(cfg, model) -> None:
    """One ``loglik`` request as token ids: a teacher that refuses them (ids outside its
    vocabulary, e.g. o200k ids sent to a teacher with another tokenizer) stops the run, exit 2."""
    from megatron_vpmoe.distill.scorers import loglik_one, teacher_prompt_ids, teacher_prompt_text
    from megatron_vpmoe.distill.teacher_client import MalformedResponse, TeacherClient, TeacherUnavailable
    from megatron_vpmoe.distill.teacher_probe import TeacherCapabilityError

    op = cfg.distill.onpolicy
    tok = teacher_tokenizer(op.teacher_prompt, op.teacher_tokenizer)
    if tok is None:
        return
    messages = [{"role": "user", "content": "What is 2 + 2?"}]

    async def run():
        async with TeacherClient(cfg.distill.teacher_url, timeout_s=op.teacher_timeout_s, retries=0) as client:
            return await loglik_one(client, teacher_prompt_text(messages, op.teacher_prompt),
                                    teacher_prompt_ids(tok, messages, op.teacher_prompt), tok, "4", model)

    which = op.teacher_tokenizer or "GPT-OSS's o200k Harmony"
    try:
        asyncio.run(run())
    except MalformedResponse as err:
        raise TeacherCapabilityError(
            f"loglik: the teacher does not score a prompt sent as token ids of {which} ({str(err)[:200]}); "
            f"set distill.onpolicy.teacher_tokenizer to the teacher's tokenizer directory") from None
    except TeacherUnavailable as err:
        raise TeacherCapabilityError(f"loglik: no answer to a prompt sent as token ids of {which} "
                                     f"({str(err)[:200]})") from None


class OnPolicyTrainer:
    def __init__(self, cfg, *, quiet: bool = False, anchor_dataset=None, tokenizer=None):
        """``anchor_dataset``: items ``{tokens, labels, loss_mask}`` for the NLL anchor (default:
        the ``data.blend`` shards through the data package) - used when ``nll_anchor_coeff > 0``.
        ``tokenizer``: the student's tokenizer (default: loaded from ``data.tokenizer``)."""
        self.cfg = cfg
        op = cfg.distill.onpolicy
        if not cfg.distill.teacher_url:
            raise ConfigError("on-policy distillation needs a teacher server", key="distill.teacher_url")
        try:
            check_teacher_url(cfg.distill.teacher_url, "the URL")
        except InputError as err:
            raise ConfigError(str(err), key="distill.teacher_url") from None
        if not op.prompts:
            raise ConfigError("give prompt files (jsonl)", key="distill.onpolicy.prompts")
        if tokenizer is None and not cfg.data.tokenizer:
            raise ConfigError("the student's tokenizer directory is needed", key="data.tokenizer")
        if op.samples_per_prompt < 2:
            raise ConfigError("group-relative advantages need >= 2 samples",
                              key="distill.onpolicy.samples_per_prompt")
        for i, s in enumerate(op.scorers):
            if s.kind not in SCORERS:
                raise ConfigError(f"unknown scorer {s.kind!r}", key=f"distill.onpolicy.scorers[{i}].kind")
        if op.nll_anchor_coeff < 0:
            raise ConfigError("must be >= 0", key="distill.onpolicy.nll_anchor_coeff")
        if any(s.kind == "loglik" for s in op.scorers):
            teacher_tokenizer(op.teacher_prompt, op.teacher_tokenizer)  # a bad path stops here (exit 2)
        self.quiet = quiet
        self.teacher = check_teacher(cfg, quiet=quiet)  # before anything is built or written
        from megatron_vpmoe.parallel import build_parallel_model
        from megatron_vpmoe.training.setup import build_training, init_layout

        self.layout = init_layout(cfg)  # the trainer's setup: process group, layout, device
        self.rank, self.world_size = self.layout.rank, self.layout.world_size
        self.ctx = self.layout.ctx
        self.dp, self.dp_rank = self.ctx.dp, self.ctx.dp_rank
        if op.prompts_per_step % self.dp:
            raise ConfigError(f"must be divisible by the data-parallel size ({self.dp})",
                              key="distill.onpolicy.prompts_per_step")
        self.prompts = load_prompts(op.prompts)
        if tokenizer is None:
            from megatron_vpmoe.tokenizers import load

            tokenizer = load(cfg.data.tokenizer).to_hf()
        self.tok = tokenizer
        from megatron_vpmoe.inference.backend import hf_token_id, speaks_harmony
        from megatron_vpmoe.tokenizers.specials import RETURN

        self.harmony = speaks_harmony(self.tok)
        self.eos_id = hf_token_id(self.tok, RETURN) if self.harmony else self.tok.eos_token_id
        from megatron_vpmoe.training.checkpoint import latest_checkpoint

        self.device = self.layout.device
        # the student and the frozen reference: engine models of one layout, both initialised
        # from the seed (the reference is the student's start unless loaded below); the student
        # with its optimizer (ZeRO-2 under parallel.distributed_optimizer) and checkpoints, as in `vpmoe train`
        state = build_training(cfg, self.layout)
        self.pm, self.optimizer, self.ckpt = state.pm, state.optimizer, state.checkpoints
        self.reference = build_parallel_model(cfg.model, self.ctx, seed=cfg.run.seed)
        self.reference.module.to(self.device)
        self.reference.train(False)
        self.reference.module.requires_grad_(False)
        self.step = 0
        load = cfg.checkpoint.load
        start = load if load not in (None, "auto") else None  # the phase-1 student
        # this run's own latest checkpoint wins (resume); else ``checkpoint.load`` names the
        # phase-1 student to start from (weights only)
        resume = latest_checkpoint(cfg.checkpoint_dir) if load is not None else None
        ref_path = op.reference or start
        if ref_path:
            self.ckpt.load(ref_path, self.reference, None, load_optimizer=False, restore_rng_state=False)
        if resume is not None:  # our own run: model, optimizer, step, RNG
            state = self.ckpt.load(resume, self.pm, self.optimizer)
            self.step = int(state["step"])
        elif start is not None:
            self.ckpt.load(start, self.pm, self.optimizer, load_optimizer=False, restore_rng_state=False)
        self.anchor = None
        if op.nll_anchor_coeff > 0:
            self.anchor = anchor_dataset if anchor_dataset is not None else self._phase1_dataset()
            from megatron_vpmoe.training.batches import GlobalBatchSampler
            from megatron_vpmoe.training.loss import LossWeights

            mbs = cfg.train.micro_batch_size
            self.anchor_sampler = GlobalBatchSampler(len(self.anchor), mbs * self.dp, mbs,
                                                     self.dp_rank, self.dp)
            self.loss_weights = LossWeights.from_config(cfg.distill)

    def _phase1_dataset(self):
        from megatron_vpmoe.data.dataset import build_datasets

        cfg = self.cfg
        train, _valid, _test = build_datasets(
            cfg.data, seed=cfg.run.seed, num_samples=cfg.train.steps * cfg.train.micro_batch_size
            * self.dp, eod_id=self.tok.eos_token_id or 0,
            pad_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0),
            cache_dir=cfg.data.cache_dir or str(Path(cfg.run.dir) / "data_cache"))
        return train

    # -- collectives over this layout ------------------------------------------------------
    def _all_reduce(self, values: list) -> list:
        """Sums over data-parallel replicas (the values themselves in one replica)."""
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.layout.dp_sum(t).tolist()

    def _share_in_replica(self, obj):
        """``obj`` of the replica's first rank (tp_rank 0 on pipeline stage 0) on every TP/PP peer."""
        import torch.distributed as dist

        for size, group in ((self.ctx.pp, self.ctx.pp_group), (self.ctx.tp, self.ctx.tp_group)):
            if size > 1:
                box = [obj]
                dist.broadcast_object_list(box, group=group, group_src=0)
                obj = box[0]
        return obj

    # one step -----------------------------------------------------------------------------
    def _generate(self, rows):
        """This replica's completions of ``rows`` (token ids), sampled through the engine."""
        import torch

        from megatron_vpmoe.parallel.generation import generate

        op = self.cfg.distill.onpolicy
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + self.step)
        return generate(self.pm, rows, op.max_new_tokens, temperature=op.temperature,
                        top_p=op.top_p, eos_id=self.eos_id, generator=gen)

    def _rollouts(self, batch):
        op = self.cfg.distill.onpolicy
        prompt_ids = [student_prompt_ids(self.tok, p.messages, self.harmony) for p in batch]
        rows = [ids for ids in prompt_ids for _ in range(op.samples_per_prompt)]
        outs = [o if o else [self.eos_id] for o in self._generate(rows)]  # at least one token to score
        seqs = [p + o for p, o in zip(rows, outs)]
        starts = [len(p) for p in rows]
        texts = [self.tok.decode([t for t in o if t != self.eos_id], skip_special_tokens=False)
                 for o in outs]
        return seqs, starts, texts

    def _score(self, batch, texts):
        """Teacher scores per group (asked once per replica) and the per-scorer means."""
        cfg, op = self.cfg, self.cfg.distill.onpolicy
        result = None
        if self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0:
            k = op.samples_per_prompt
            groups = [(p.messages, p.reference,
                       [student_answer(t, self.harmony) for t in texts[g * k:(g + 1) * k]])
                      for g, p in enumerate(batch)]
            model = getattr(self.teacher, "model", None)
            result = asyncio.run(score_groups(op, cfg.distill.teacher_url, groups, op.teacher_prompt, model))
        return self._share_in_replica(result)

    def _micro_batches(self, seqs, starts, advantages) -> tuple:
        """The samples as engine micro-batches of ``train.micro_batch_size`` rows, all of one
        shape (the pipeline's requirement): ``input_ids``/``labels`` (the sampled tokens, -100
        outside completions), ``mask``, ``adv`` and ``weight`` (0: a dropped sample or padding);
        and their sequence length."""
        import torch

        mbs = self.cfg.train.micro_batch_size
        width = max(len(s) for s in seqs)
        if self.anchor is not None:
            width = max(width, self.cfg.data.seq_length + 1)
        width = -(-width // 16) * 16 + 1  # few distinct shapes (the pipeline builds one per shape)
        n = -(-len(seqs) // mbs) * mbs
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width - 1)
        adv = torch.zeros(n)
        weight = torch.zeros(n)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, st - 1: len(s) - 1] = 1
            if advantages[i] is not None:
                adv[i], weight[i] = advantages[i], 1.0
        labels = ids[:, 1:].masked_fill(mask == 0, -100)
        out = []
        for j in range(0, n, mbs):
            part = slice(j, j + mbs)
            out.append({k: v.to(self.device) for k, v in {
                "input_ids": ids[part, :-1], "labels": labels[part], "mask": mask[part],
                "adv": adv[part], "weight": weight[part]}.items()})
        return out, width - 1

    def _anchor_batch(self, width: int) -> dict:
        """This rank's micro-batch of phase-1 data for the current step, padded to ``width``."""
        import torch

        from megatron_vpmoe.training.batches import collate
        from megatron_vpmoe.training.loss import roles_from_loss_mask

        idx = self.anchor_sampler.micro_batches(self.step)[0]
        mb = collate([self.anchor[i] for i in idx])
        pad = width - mb["tokens"].shape[1]
        roles = roles_from_loss_mask(mb["loss_mask"])
        labels = mb["labels"].masked_fill(roles == 0, -100)
        ids = torch.nn.functional.pad(mb["tokens"], (0, pad))
        labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
        roles = torch.nn.functional.pad(roles, (0, pad))
        return {"input_ids": ids.to(self.device), "labels": labels.to(self.device),
                "roles": roles.to(self.device), "anchor": True}

    def _logprobs(self, pm, micro_batches, key: str) -> None:
        """Puts the sampled tokens' log-probs under ``pm`` into ``mb[key]`` (on the last stage)."""
        import torch

        def capture(per_token, mb):
            mb[key] = -per_token.detach().float()
            return per_token.sum(), torch.zeros(1, dtype=torch.float64, device=per_token.device)

        was_training = pm.module.training
        pm.train(False)
        try:
            pm.forward_only(micro_batches, capture)
        finally:
            pm.train(was_training)

    def _loss_hook(self, n_scored: float, anchor_objective):
        """The engine's loss hook: the policy loss of a micro-batch's share of the global batch
        (sum over its scored samples / ``n_scored``), or ``nll_anchor_coeff`` x the role-aware
        NLL (the trainer's :class:`Objective`) for the anchor micro-batch. Stats (summed over
        micro-batches and ranks): a :data:`POLICY_STATS` vector."""
        from megatron_vpmoe.distill.policy_loss import sequence_terms

        op = self.cfg.distill.onpolicy

        def hook(per_token, mb):
            stats = POLICY_STATS.zeros(per_token.device)
            named = POLICY_STATS.view(stats)
            if mb.get("anchor"):
                loss, named.anchor_nll = anchor_objective(per_token.float(), mb["roles"])
                return op.nll_anchor_coeff * loss, stats
            terms = sequence_terms(-per_token.float(), mb["old"], mb["ref"], mb["adv"], mb["mask"],
                                   clip_eps=op.clip_eps, kl_coeff=op.kl_coeff)
            w = mb["weight"]
            loss = (terms["loss"] * w).sum() / max(n_scored, 1.0)
            named.policy_loss = loss.detach()
            for name in ("pg", "kl", "clipped", "tokens"):
                setattr(named, name, (terms[name] * w).sum())
            return loss, stats

        return hook

    def train_step(self) -> dict:
        import torch

        from megatron_vpmoe.training.optimizer import clip_gradients, set_learning_rate
        from megatron_vpmoe.training.schedule import learning_rate

        cfg, op = self.cfg, self.cfg.distill.onpolicy
        t0 = time.perf_counter()
        n = len(self.prompts)
        per_rank = op.prompts_per_step // self.dp
        first = self.step * op.prompts_per_step + self.dp_rank * per_rank
        batch = [self.prompts[(first + i) % n] for i in range(per_rank)]
        seqs, starts, texts = self._rollouts(batch)
        scores, by_kind = self._score(batch, texts)
        adv = [a for group in scores for a in group_advantages(group)]
        micro, width = self._micro_batches(seqs, starts, adv)
        self._logprobs(self.pm, micro, "old")
        self._logprobs(self.reference, micro, "ref")
        n_scored = float(self.layout.dp_sum(torch.tensor([float(sum(a is not None for a in adv))],
                                                   dtype=torch.float64, device=self.device))[0])
        anchor_objective = None
        if self.anchor is not None:
            from megatron_vpmoe.training.loss import Objective, role_counts

            anchor_mb = self._anchor_batch(width)
            micro = micro + [anchor_mb]
            anchor_objective = Objective(self.layout.dp_sum(role_counts(anchor_mb["roles"]).to(self.device)),
                                         self.loss_weights)
        stats = POLICY_STATS.zeros()
        grad_norm = 0.0
        set_learning_rate(self.optimizer, learning_rate(self.step, cfg.train))
        self.pm.train(True)
        # nothing scored and no anchor: no loss to learn from (every rank agrees: n_scored is global)
        if n_scored > 0 or self.anchor is not None:
            for _ in range(max(1, op.ppo_epochs)):
                stats = self.pm.forward_backward(micro, self._loss_hook(n_scored, anchor_objective)).cpu()
                grad_norm = float(clip_gradients(self.pm.grad_tensors(), cfg.train.optimizer.clip_grad,
                                                 total_norm=self.pm.grad_norm()))
                if math.isfinite(grad_norm):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.pm.reset_expert_counters()
        self.step += 1
        valid = [s for group in scores for s in group if s is not None]
        spreads = [_std([s for s in g if s is not None]) for g in scores]
        dropped = len(adv) - sum(a is not None for a in adv)
        totals = self._all_reduce([sum(valid), len(valid), sum(spreads), len(spreads), dropped,
                                   sum(len(s) - st for s, st in zip(seqs, starts)), len(seqs)])
        score_sum, n_valid, spread_sum, n_groups, dropped_all, resp_tokens, n_seqs = totals
        secs = time.perf_counter() - t0
        per_sample = max(n_scored, 1.0)
        stats = POLICY_STATS.unpack(stats)
        record = {"step": self.step, "kind": "onpolicy",
                  "teacher_score": score_sum / n_valid if n_valid else float("nan"),
                  "reward_spread": spread_sum / max(n_groups, 1),
                  "policy_loss": stats["policy_loss"], "pg": stats["pg"] / per_sample,
                  "kl": stats["kl"] / per_sample,
                  "clip_fraction": stats["clipped"] / max(stats["tokens"], 1.0),
                  "grad_norm": grad_norm, "response_tokens": resp_tokens / n_seqs,
                  "samples_per_s": n_seqs / secs, "dropped": int(dropped_all), **by_kind}
        if self.anchor is not None:
            record["anchor_nll"] = stats["anchor_nll"]
        self._last = (batch, texts, scores)
        return record

    def _sample_table(self) -> list:
        batch, texts, scores = self._last
        k = self.cfg.distill.onpolicy.samples_per_prompt
        return [{"step": self.step, "prompt_id": p.id, "prompt": p.messages[-1]["content"],
                 "completion": texts[g * k + j], "score": scores[g][j]}
                for g, p in enumerate(batch) for j in range(k)]

    def run(self) -> list:
        from megatron_vpmoe.config import dump_config
        from megatron_vpmoe.training.metrics import MetricsLogger
        from megatron_vpmoe.utils.progress import terminal_bar

        cfg, op = self.cfg, self.cfg.distill.onpolicy
        run_dir = Path(cfg.run.dir)
        main = self.rank == 0
        logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.log.tensorboard,
                               resume_step=self.step)
        history = []
        bar = terminal_bar(total=cfg.train.steps, initial=self.step, desc="on-policy", unit="step",
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
                self.ckpt.save(self.step, self.pm, self.optimizer, {"kind": "onpolicy"},
                               config_text=dump_config(cfg))
        bar.close()
        return history


def score_change(history: list, n_prompts: int, prompts_per_step: int) -> tuple:
    """``(before, after, how)``: the teacher's mean score at the start and the end of a run, over the
    same prompts when the run passes over its prompts (in order, ``prompts_per_step`` a step) at
    least twice: the first pass against the last; else the first step against the last (different
    prompts: ``how`` says so)."""
    scores = [h["teacher_score"] for h in history]
    per_pass = n_prompts // math.gcd(n_prompts, prompts_per_step)  # steps until the prompt order repeats
    if per_pass and len(scores) >= 2 * per_pass:  # any per_pass consecutive steps read every prompt alike
        before, after = sum(scores[:per_pass]) / per_pass, sum(scores[-per_pass:]) / per_pass
        return before, after, f"mean over the same {n_prompts} prompts, first vs last {per_pass} step(s)"
    return scores[0], scores[-1], "first vs last step (different prompts: not comparable)"


def _std(xs: list) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
