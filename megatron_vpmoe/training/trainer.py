"""The pretraining loop: builds model, optimizer, data and checkpoints from a config and runs it.

Every layout runs through the parallel engine (``megatron_vpmoe.parallel``): ``init_parallel``
makes the TP/EP/PP/DP groups, ``build_parallel_model`` this rank's shard. One optimizer step =
one global batch: this data-parallel rank's micro-batches go through
``ParallelModel.forward_backward`` with the role-aware objective as its loss hook (on the last
pipeline stage under PP), gradients are reduced over the layout and clipped by the global norm
(every shard counted once), a non-finite loss or gradient norm skips the update, the learning
rate follows the schedule, and the MoE routers' expert biases are updated from the
data-parallel all-reduced expert load. Checkpoints
(``checkpoint.py``) capture everything the next step depends on, so a resumed run reproduces
an uninterrupted one bit for bit.

Test hook: ``VPMOE_TEST_NAN_STEPS="3,7"`` multiplies the loss of those 1-based steps by NaN
(documented in docs/training.md); it exercises the non-finite guard.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_vpmoe.training import batches as batching
from megatron_vpmoe.training.distributed import RankInfo, gather_objects
from megatron_vpmoe.training.loss import (
    LossWeights,
    Objective,
    bits_per_byte,
    counted_bytes,
    role_counts,
    role_nll_sums,
    token_byte_lengths,
)
from megatron_vpmoe.training.metrics import MetricsLogger, memory_stats
from megatron_vpmoe.training.memory_report import RankMemoryReport
from megatron_vpmoe.training.optimizer import clip_gradients, optimizer_step, set_learning_rate
from megatron_vpmoe.training.profiling import StepProfiler
from megatron_vpmoe.training.preemption import (
    PreemptionHandler,
    clear_requeue_marker,
    write_requeue_marker,
)
from megatron_vpmoe.training.schedule import learning_rate
from megatron_vpmoe.training.run_data import build_run_datasets, load_run_tokenizer
from megatron_vpmoe.training.run_state import resume, save_run_checkpoint, trainer_state
from megatron_vpmoe.training.setup import Precision, build_training, init_layout
from megatron_vpmoe.training.step_log import LOSS_STATS, NonFiniteError, StepLog
from megatron_vpmoe.utils.errors import EXIT_OK, EXIT_REQUEUE
from megatron_vpmoe.utils.notices import install as install_notices
from megatron_vpmoe.utils.progress import is_terminal, terminal_bar

NAN_HOOK_ENV = "VPMOE_TEST_NAN_STEPS"
__all__ = ["NonFiniteError", "Trainer"]


def _nan_hook_steps() -> set:
    spec = os.environ.get(NAN_HOOK_ENV, "")
    return {int(s) for s in spec.split(",") if s.strip()}


class Trainer:
    """``Trainer(cfg).run()`` trains per ``cfg`` and returns the process exit code.

    ``model_factory(model_cfg) -> torch.nn.Module`` (data parallel only) and ``datasets = (train, valid)`` replace the
    defaults (``VpmoeModel`` and the data package's ``build_datasets``); ``tokenizer`` provides
    bytes per token for bits per byte.
    """

    def __init__(self, cfg, *, model_factory: Optional[Callable] = None,
                 datasets: Optional[Sequence] = None, tokenizer=None, quiet: bool = False):
        self.cfg = cfg
        # the process group, the layout's groups, the device; the known notices filtered from the
        # start, also when the trainer runs outside the CLI (spawned ranks)
        self.layout = init_layout(cfg, on_joined=lambda info: install_notices(rank=info.rank))
        self.info: RankInfo = self.layout.info
        self.rank, self.world_size = self.layout.rank, self.layout.world_size
        self.is_main = self.rank == 0
        self.quiet = quiet
        self.ctx, self.device = self.layout.ctx, self.layout.device
        self.dp_size, self.dp_rank = self.ctx.dp, self.ctx.dp_rank
        self.accum = cfg.train.check_batch_layout(self.dp_size)
        self.precision = Precision(cfg.train, self.device)  # bf16 autocast, FP8 recipe
        self.memory = RankMemoryReport(cfg.log.memory_report, self.rank)
        state = build_training(cfg, self.layout, transformer_impl=cfg.train.transformer_impl,
                               model_factory=model_factory, async_save=cfg.checkpoint.async_save,
                               construction=lambda: self.memory.phase("construction"),
                               bf16_master=self.precision.autocast_dtype is not None and cfg.train.master_weights)
        self.pm, self.optimizer, self.checkpoints = state.pm, state.optimizer, state.checkpoints
        self.raw_model = self.pm.module  # this rank's shard (the whole model without TP/EP/PP)
        self.log = StepLog(cfg, self.world_size, self.raw_model, self._print)  # records, skips, summary
        self.weights = LossWeights.from_config(cfg.distill)
        self.tokenizer = tokenizer
        self._datasets = datasets
        self.step = 0
        self.loaded_from: Optional[str] = None

    # ---- setup ---------------------------------------------------------------------------
    def _load_tokenizer(self):
        """The given tokenizer, else ``data.tokenizer``'s (checked against the vocabulary), else None."""
        if self.tokenizer is None:
            self.tokenizer = load_run_tokenizer(self.cfg)
        return self.tokenizer

    def _maybe_resume(self) -> None:
        """Load ``checkpoint.load`` (``auto``: the newest intact one), if any (:func:`resume`)."""
        state = resume(self.cfg, self.checkpoints, self.pm, self.optimizer)
        if state is None:
            return
        self.loaded_from = state["path"]
        if self.cfg.checkpoint.load_optimizer:  # a full resume; weights only starts a fresh run from them
            self.step = int(state["step"])
            self.log.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))

    def save_checkpoint(self) -> str:
        state = trainer_state(self.cfg, self.step, self.world_size, self.dp_size, self.log.nonfinite_in_a_row)
        return str(save_run_checkpoint(self.cfg, self.checkpoints, self.step, self.pm, self.optimizer, state))

    # ---- one step ------------------------------------------------------------------------
    def _engine_batches(self, micro_batches: List[Dict[str, torch.Tensor]]) -> List[Dict]:
        """The data's micro-batches as the engine takes them (:func:`batches.engine_batches`)."""
        return batching.engine_batches(micro_batches, self.ctx.pp > 1, self.raw_model.default_positions)

    def _objective_hook(self, objective: Objective, inject_nan: bool = False):
        """The engine's loss hook: ``(loss to backpropagate, stats)`` per micro-batch, stats a
        :data:`LOSS_STATS` vector (its ``aux`` field stays 0: the step fills it)."""

        def loss_fn(per_token: torch.Tensor, mb: Dict) -> tuple:
            per_token = per_token.float()
            if inject_nan:
                per_token = per_token * float("nan")
            stats = LOSS_STATS.zeros(per_token.device)
            named = LOSS_STATS.view(stats)
            if objective is not None:
                loss, named.nll = objective(per_token, mb["roles"])
            else:  # validation: no objective needed
                loss = per_token.sum()
            named.role_nll = role_nll_sums(per_token, mb["roles"])
            if self.byte_lengths is not None:
                named.bytes = counted_bytes(mb["labels"], mb["roles"], self.byte_lengths)
            return loss, stats

        return loss_fn

    def train_step(self, micro_batches: List[Dict[str, torch.Tensor]], inject_nan: bool = False) -> Dict:
        """One optimizer step over this rank's micro-batches (collated, so checked on the host).

        Returns the step's raw metrics as device tensors; :meth:`StepLog.read` turns a run of
        them into log records with one host read. Nothing in the step reads a device value back:
        the skip decision (no supervised tokens, non-finite loss or gradient norm) is a device
        flag that fused AdamW and the expert-bias update take as it is. The only host reads left
        are the dropless MoE's token counts per layer call (the grouped GEMM's split sizes)."""
        batches = self._engine_batches(micro_batches)
        counts = self.layout.dp_sum(sum(role_counts(mb["roles"]) for mb in batches).to(self.device))
        objective = Objective(counts, self.weights, grad_scale=1.0)
        with self.precision.autocast():
            stats = self.pm.forward_backward(batches, self._objective_hook(objective, inject_nan))
        # the MoE layers added the aux loss themselves (every stage; averaged over micro-batches and DP)
        named = LOSS_STATS.view(stats)
        named.aux = self.pm.aux_loss_added()
        grad_norm = clip_gradients(self.pm.grad_tensors(), self.cfg.train.optimizer.clip_grad,
                                   total_norm=self.pm.grad_norm()).to(stats.device, torch.float64)
        lr = learning_rate(self.step, self.cfg.train)
        # a global batch without supervised tokens has no loss to learn from: skip it (on the device)
        finite = (counts[1:].sum() > 0) & torch.isfinite(named.nll + named.aux) & torch.isfinite(grad_norm)
        set_learning_rate(self.optimizer, lr)
        optimizer_step(self.optimizer, skip=~finite)
        load = None
        if self.cfg.model.num_moe_experts:  # resets the routing counters whether applied or not
            load = self.pm.update_expert_bias(apply=finite)
        self.optimizer.zero_grad(set_to_none=True)
        return {"counts": counts, "stats": stats, "grad_norm": grad_norm, "finite": finite, "load": load, "lr": lr}

    def _flush_metrics(self, pending: List[Dict], logger, bar, sampler, interval_stats: bool = True) -> None:
        """Log the pending steps (:meth:`StepLog.flush`: one host read); every rank calls it at the same steps."""
        self.log.flush(pending, logger, bar, sampler, interval_stats)

    # ---- validation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset) -> Dict:
        t = self.cfg.train
        n = t.eval_iters * t.global_batch_size
        sampler = batching.GlobalBatchSampler(len(dataset), n, t.micro_batch_size, self.dp_rank, self.dp_size)
        batches = self._engine_batches(batching.load_micro_batches(dataset, sampler.micro_batches(0), self.device))
        counts = self.layout.dp_sum(sum(role_counts(mb["roles"]) for mb in batches).to(self.device))
        self.pm.train(False)
        try:
            with self.precision.autocast():
                stats = self.pm.forward_only(batches, self._objective_hook(None))
        finally:
            self.pm.train(True)
            self.pm.reset_expert_counters()
        coef = Objective(counts, self.weights).coefficients.to(stats.device)
        named = LOSS_STATS.view(stats)
        out = {"loss": float((named.role_nll * coef).sum()),
               "lm_loss": float(named.role_nll.sum() / counts[1:].sum().clamp(min=1))}
        if self.byte_lengths is not None:
            out["bits_per_byte"] = bits_per_byte(float(named.role_nll.sum()), float(named.bytes))
        return out

    # ---- the loop -------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self.is_main and not self.quiet:
            from tqdm import tqdm

            tqdm.write(text)

    def run(self, stop_at_step: Optional[int] = None) -> int:
        """Train to ``train.steps`` (or only to ``stop_at_step``, checkpointing there: the
        schedule still spans ``train.steps``); returns the exit code (0, or 75 when preempted)."""
        cfg, t = self.cfg, self.cfg.train
        end = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
        self._maybe_resume()
        train_set, valid_set = (self._datasets if self._datasets is not None
                                else build_run_datasets(self.cfg, self._load_tokenizer()))
        tok = self._load_tokenizer()
        self.byte_lengths = None if tok is None else token_byte_lengths(tok, cfg.model.vocab_size).to(self.device)
        self.log.byte_lengths = self.byte_lengths
        sampler = batching.GlobalBatchSampler(len(train_set), t.global_batch_size, t.micro_batch_size,
                                              self.dp_rank, self.dp_size)
        if self.is_main:
            from megatron_vpmoe.config import save_resolved_config

            save_resolved_config(cfg)
            clear_requeue_marker(cfg.run.dir)
        logger = MetricsLogger(cfg.run.dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                               wandb_project=cfg.log.wandb_project, run_name=cfg.run.name,
                               resume_step=self.step)
        if self.loaded_from and cfg.checkpoint.load_optimizer:
            self._print(f"resumed from {self.loaded_from} at step {self.step}")
        elif self.loaded_from:  # weights only: a fresh run (optimizer, schedule, data order) from them
            self._print(f"initialised from {self.loaded_from} (weights only; fresh optimizer, step 0)")
        nan_steps = _nan_hook_steps()
        profiler = StepProfiler(cfg.log.profile_steps, cfg.run.dir, self.rank)
        preemption = PreemptionHandler(announce=self.is_main and not self.quiet).install()
        bar = None
        if self.is_main and cfg.log.progress_bar and not self.quiet and is_terminal():  # else: step lines
            bar = terminal_bar(total=t.steps, initial=self.step, desc="train", unit="step")
        self.log.start(self.step)
        self.summary = self.log.summary
        start_time = time.perf_counter()
        start_step = self.step
        batches = iter(batching.micro_batch_loader(train_set, sampler, self.step, end, cfg.data.num_workers))
        exit_code = EXIT_OK
        pending: List[Dict] = []  # steps whose metrics are still on the device (read at the log interval)
        try:
            self.pm.train(True)
            while self.step < end:
                if preemption.requested():
                    self._flush_metrics(pending, logger, bar, sampler)
                    pending = []
                    path = self.save_checkpoint()
                    self.checkpoints.finalize()
                    if self.is_main:
                        write_requeue_marker(cfg.run.dir, self.step, path)
                    self._print(preemption.saved_message(path, self.step))
                    exit_code = EXIT_REQUEUE
                    break
                t0 = time.perf_counter()
                micro = [{k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                         for _ in range(sampler.accumulation_steps)]
                profiler.before_step(self.step + 1)
                with self.memory.phase("first_step" if self.step == start_step else "step"):
                    raw = self.train_step(micro, inject_nan=(self.step + 1) in nan_steps)
                profiler.after_step(self.step + 1)
                if self.step == start_step:
                    self.memory.record_sizes(self.raw_model, self.optimizer)
                self.step += 1
                raw.update(step=self.step, step_time_s=time.perf_counter() - t0, memory=memory_stats())
                pending.append(raw)
                if bar is not None:
                    bar.update(1)
                evaluating = bool(t.eval_interval) and (self.step % t.eval_interval == 0 or self.step == t.steps)
                interval = cfg.checkpoint.interval
                saving = bool(interval and self.step % interval == 0) or self.step == end
                first = self.step == start_step + 1  # loss and tokens/s on screen after one step
                due = self.step % cfg.log.interval == 0 or evaluating or saving
                if first or due:  # the first step's flush shows progress; the interval's stats wait
                    self._flush_metrics(pending, logger, bar, sampler, interval_stats=due)
                    pending = []
                if evaluating:
                    valid = self.evaluate(valid_set)
                    valid.update(kind="valid", step=self.step)
                    logger.log(valid)
                    self.summary["valid"] = valid
                    bpb = valid.get("bits_per_byte")
                    self._print(f"step {self.step}: validation loss {valid['loss']:.4f}"
                                + (f" bits/byte {bpb:.4f}" if bpb is not None else ""))
                if saving:
                    with self.memory.phase("checkpoint_save"):
                        self.save_checkpoint()
            with self.memory.phase("checkpoint_finalize"):
                self.checkpoints.finalize()
        except NonFiniteError:
            self.checkpoints.finalize()  # a pending async save holds good weights: publish it
            raise
        finally:
            profiler.close()
            preemption.uninstall()
            if bar is not None:
                bar.close()
            logger.close()
        elapsed = time.perf_counter() - start_time
        self.memory.write(cfg.run.dir, self.world_size, gather_objects if self.world_size > 1 else None)
        self.summary.update(steps_run=self.step - start_step, elapsed_s=elapsed,
                            tokens_per_s=(self.step - start_step) * t.global_batch_size * cfg.data.seq_length / max(elapsed, 1e-9))
        if self.is_main and not self.quiet:
            print(self.log.summary_text(self.step), flush=True)
        return exit_code
