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

import contextlib
import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_vpmoe.training import batches as batching
from megatron_vpmoe.training.checkpoint import (
    CheckpointManager,
    latest_checkpoint,
    latest_intact_checkpoint,
    resolve_checkpoint,
)
from megatron_vpmoe.training.distributed import RankInfo, init_distributed
from megatron_vpmoe.training.loss import (
    NUM_ROLES,
    LossWeights,
    Objective,
    bits_per_byte,
    counted_bytes,
    role_counts,
    role_nll_sums,
    roles_from_loss_mask,
    ROLE_NAMES,
)
from megatron_vpmoe.training.metrics import (
    MetricsLogger,
    flops_per_token,
    memory_stats,
    peak_flops_per_device,
    peak_memory_over_ranks,
    router_bias_stats,
    router_entropy_stats,
)
from megatron_vpmoe.training.memory_report import RankMemoryReport
from megatron_vpmoe.training.optimizer import build_optimizer, clip_gradients, optimizer_step, set_learning_rate
from megatron_vpmoe.training.profiling import StepProfiler
from megatron_vpmoe.training.preemption import (
    PreemptionHandler,
    clear_requeue_marker,
    write_requeue_marker,
)
from megatron_vpmoe.training.schedule import learning_rate
from megatron_vpmoe.training.step_stats import Fields
from megatron_vpmoe.utils.errors import EXIT_OK, EXIT_REQUEUE, ConfigError, VpmoeError
from megatron_vpmoe.utils.notices import install as install_notices

NAN_HOOK_ENV = "VPMOE_TEST_NAN_STEPS"

# one micro-batch's statistics from the loss hook, summed by the engine over micro-batches and ranks:
# the objective's NLL part, the MoE aux loss (filled by the step), the NLL sum per role, the counted bytes
LOSS_STATS = Fields(nll=1, aux=1, role_nll=NUM_ROLES, bytes=1)
# one step's row of device values, read back for many steps in one transfer (load: experts per layer)
STEP_ROW = Fields(counts=NUM_ROLES, stats=LOSS_STATS.size, grad_norm=1, finite=1, load=None)


class NonFiniteError(VpmoeError):
    """Too many non-finite steps in a row."""


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
        self.info: RankInfo = init_distributed()
        self.rank, self.world_size = self.info.rank, self.info.world_size
        install_notices(rank=self.rank)  # also when the trainer runs outside the CLI (spawned ranks)
        self.is_main = self.rank == 0
        self.quiet = quiet
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        from megatron_vpmoe.parallel import ParallelModel, build_parallel_model, init_parallel

        cfg.parallel.validate(cfg.model)
        if cfg.parallel.sequence_parallel:
            if cfg.data.seq_length % cfg.parallel.tensor:
                raise ConfigError(f"data.seq_length ({cfg.data.seq_length}) must be divisible by parallel.tensor "
                                  f"({cfg.parallel.tensor}) to split the sequence", key="parallel.sequence_parallel")
            if cfg.train.transformer_impl == "transformer_engine":
                raise ConfigError("sequence parallelism runs with the local (megatron-core) linears, not "
                                  "train.transformer_impl: transformer_engine", key="parallel.sequence_parallel")
        cfg.parallel.resolve_data(self.world_size)  # e.g. tensor=2 in one process: one line naming the key
        self.ctx = init_parallel(cfg.parallel)
        self.dp_size, self.dp_rank = self.ctx.dp, self.ctx.dp_rank
        self.accum = cfg.train.check_batch_layout(self.dp_size)
        if cfg.train.transformer_impl == "transformer_engine":
            from megatron_vpmoe.kernels.te import te_status

            status = te_status()
            if not status.available:
                raise ConfigError(f"Transformer Engine is not usable here: {status.reason}",
                                  key="train.transformer_impl")
        self._setup_precision()
        self.memory = RankMemoryReport(cfg.log.memory_report, self.rank)

        if model_factory is not None:  # any nn.Module with VpmoeModel's interface, DP only
            if self.ctx.tp * self.ctx.ep * self.ctx.pp > 1:
                raise VpmoeError("a custom model_factory runs data-parallel only")
            torch.manual_seed(cfg.run.seed)
            self.pm = ParallelModel(cfg.model, self.ctx, model_factory(cfg.model).to(self.device))
        else:
            with self.memory.phase("construction"):
                self.pm = build_parallel_model(cfg.model, self.ctx, seed=cfg.run.seed,
                                               transformer_impl=cfg.train.transformer_impl)
            self.pm.module.to(self.device)
        self.raw_model = self.pm.module  # this rank's shard (the whole model without TP/EP/PP)
        self.pm.set_recompute(cfg.train.recompute)
        self.optimizer = build_optimizer(self.raw_model, cfg.train.optimizer)
        if cfg.parallel.distributed_optimizer:  # ZeRO-2: AdamW state and gradients sharded over DP ranks
            from megatron_vpmoe.parallel.zero import DistributedOptimizer

            self.optimizer = DistributedOptimizer(self.optimizer, self.pm)  # gradients reduce-scattered
        self.weights = LossWeights.from_config(cfg.distill)
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                                             async_save=cfg.checkpoint.async_save)
        self.tokenizer = tokenizer
        self._datasets = datasets
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.loaded_from: Optional[str] = None

    # ---- setup ---------------------------------------------------------------------------
    def _setup_precision(self) -> None:
        p = self.cfg.train.precision
        use_bf16 = p == "bf16" or (p == "auto" and torch.cuda.is_available())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.fp8_recipe = None
        if self.cfg.train.fp8:  # implies transformer_engine, whose availability is checked above
            from megatron_vpmoe.kernels import te

            self.fp8_recipe = te.fp8_recipe(self.cfg.train.fp8)

    def _autocast(self):
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.fp8_recipe is not None:  # TE linears compute in FP8 under the recipe
            from megatron_vpmoe.kernels import te

            stack.enter_context(te.fp8_autocast(True, self.fp8_recipe))
        return stack

    def _load_tokenizer(self):
        if self.tokenizer is None and self.cfg.data.tokenizer:
            from megatron_vpmoe.tokenizers import load

            self.tokenizer = load(self.cfg.data.tokenizer)
            size, vocab = self.tokenizer.vocab_size, self.cfg.model.vocab_size
            if size > vocab:  # its ids would index past the embedding at step 1
                raise ConfigError(f"data.tokenizer {self.cfg.data.tokenizer} has {size} tokens, more than "
                                  f"model.vocab_size {vocab}", key="model.vocab_size")
        return self.tokenizer

    def _num_samples(self) -> tuple:
        t = self.cfg.train
        train = t.steps * t.global_batch_size
        evals = (t.steps // t.eval_interval + 1) if t.eval_interval else 0
        valid = max(1, t.eval_iters * t.global_batch_size) if evals else 1
        return train, valid, max(1, t.eval_iters * t.global_batch_size)

    def _build_datasets(self):
        if self._datasets is not None:
            return self._datasets
        from megatron_vpmoe.data.dataset import build_datasets

        tok = self._load_tokenizer()
        eod = getattr(tok, "eod_id", 0) if tok is not None else 0
        pad = getattr(tok, "pad_id", eod) if tok is not None else 0
        cache = self.cfg.data.cache_dir or os.path.join(self.cfg.run.dir, "data_cache")
        # every rank at once: megatron-core's builder lets rank 0 build the index cache first
        # and the other ranks read it (its own barriers)
        train, valid, _test = build_datasets(self.cfg.data, seed=self.cfg.run.seed,
                                             num_samples=self._num_samples(), eod_id=eod, pad_id=pad,
                                             cache_dir=cache, vocab_size=self.cfg.model.vocab_size)
        return train, valid

    def _byte_lengths(self) -> Optional[torch.Tensor]:
        tok = self._load_tokenizer()
        if tok is None:
            return None
        from megatron_vpmoe.training.loss import token_byte_lengths

        return token_byte_lengths(tok, self.cfg.model.vocab_size)

    def _maybe_resume(self) -> None:
        ck = self.cfg.checkpoint
        if ck.load is None:
            return
        if ck.load == "auto":  # the newest intact checkpoint (damaged ones skipped with a warning)
            path = latest_intact_checkpoint(self.cfg.checkpoint_dir)
            if path is None:
                return
        else:
            path = resolve_checkpoint(ck.load)
        state = self.checkpoints.load(path, self.pm, self.optimizer, load_optimizer=ck.load_optimizer,
                                      restore_rng_state=ck.load_optimizer,
                                      model_config=dataclasses.asdict(self.cfg.model), verify=ck.load != "auto")
        self.loaded_from = state["path"]
        if ck.load_optimizer:  # a full resume; weights only starts a fresh run from them
            self.step = int(state["step"])
            self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
            if state.get("global_batch_size") not in (None, self.cfg.train.global_batch_size):
                raise VpmoeError(f"{path}: saved with train.global_batch_size="
                                 f"{state['global_batch_size']}; resuming with a different global "
                                 f"batch size would replay or skip data")

    def _trainer_state(self) -> Dict:
        p = self.cfg.parallel
        return {
            "step": self.step,
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "global_batch_size": self.cfg.train.global_batch_size,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.world_size,
            "layout": {"data": self.dp_size, "tensor": p.tensor, "pipeline": p.pipeline, "expert": p.expert},
            "schedule": {"kind": self.cfg.train.schedule.kind, "lr": learning_rate(max(0, self.step - 1), self.cfg.train)},
        }

    def save_checkpoint(self) -> str:
        from megatron_vpmoe.config import dump_config

        path = self.checkpoints.save(self.step, self.pm, self.optimizer, self._trainer_state(),
                                     config_text=dump_config(self.cfg))
        return str(path)

    @staticmethod
    def _gather_objects(obj) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    # ---- one step ------------------------------------------------------------------------
    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (TP/PP peers hold the same batch)."""
        if self.ctx.dp > 1:
            dist.all_reduce(t, group=self.ctx.dp_group)
        return t

    def _engine_batches(self, micro_batches: List[Dict[str, torch.Tensor]]) -> List[Dict]:
        """The data's micro-batches as the engine takes them, with label roles attached."""
        out = []
        for mb in micro_batches:
            positions = mb.get("position_ids")
            if self.ctx.pp > 1 and positions is not None:
                default = self.raw_model.default_positions(mb["tokens"])
                if not torch.equal(positions, default):
                    raise VpmoeError("pipeline parallelism uses positions 0..S-1; this data has "
                                     "other position_ids (documents reset positions)")
                positions = None
            out.append({"input_ids": mb["tokens"], "labels": mb["labels"], "position_ids": positions,
                        "roles": roles_from_loss_mask(mb["loss_mask"])})
        return out

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

        Returns the step's raw metrics as device tensors; :meth:`read_step_metrics` turns a run of
        them into log records with one host read. Nothing in the step reads a device value back:
        the skip decision (no supervised tokens, non-finite loss or gradient norm) is a device
        flag that fused AdamW and the expert-bias update take as it is. The only host reads left
        are the dropless MoE's token counts per layer call (the grouped GEMM's split sizes)."""
        batches = self._engine_batches(micro_batches)
        counts = self._dp_sum(sum(role_counts(mb["roles"]) for mb in batches).to(self.device))
        objective = Objective(counts, self.weights, grad_scale=1.0)
        with self._autocast():
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

    def read_step_metrics(self, steps: List[Dict]) -> List[Dict]:
        """Log records of :meth:`train_step` results, read back from the device in one transfer."""
        if not steps:
            return []
        rows = [STEP_ROW.pack(counts=r["counts"], stats=r["stats"], grad_norm=r["grad_norm"], finite=r["finite"],
                              load=[] if r["load"] is None else r["load"]) for r in steps]
        values = torch.cat(rows).tolist()  # the one host read
        out, at = [], 0
        for r, row in zip(steps, rows):
            v = STEP_ROW.unpack(values[at:at + row.numel()])
            at += row.numel()
            counts, stats = v["counts"], LOSS_STATS.unpack(v["stats"])
            finite = bool(v["finite"])
            tokens = sum(counts[1:])
            nll, aux, role_nll = stats["nll"], stats["aux"], stats["role_nll"]
            rec = {
                "loss": nll + aux if tokens > 0 else None, "nll": nll if tokens > 0 else None,
                "aux_loss": aux, "lm_loss": sum(role_nll) / tokens if tokens > 0 else None,
                "grad_norm": v["grad_norm"], "lr": r["lr"], "skipped": not finite, "loss_tokens": int(tokens),
            }
            for role, name in ROLE_NAMES.items():
                if counts[role] > 0:
                    rec[f"nll_{name}"] = role_nll[role] / counts[role]
            if self.byte_lengths is not None:
                rec["bits_per_byte"] = bits_per_byte(sum(role_nll), stats["bytes"])
            if finite and r["load"] is not None and r["load"].numel():
                load = torch.tensor(v["load"], dtype=torch.float64).view(r["load"].shape)
                ratios = load.max(1).values / load.mean(1).clamp_min(1e-9)
                rec["expert_load_max_over_mean"] = [round(x, 4) for x in ratios.tolist()]
            out.append(rec)
        return out

    def _flush_metrics(self, pending: List[Dict], logger, bar, sampler) -> None:
        """Read the pending steps' metrics (one host read), log them, report skipped steps and
        stop after ``train.max_nonfinite_steps`` non-finite steps in a row. Every rank calls it at
        the same steps (it gathers the peak memory over ranks)."""
        if not pending:
            return
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = t.global_batch_size * cfg.data.seq_length
        flops_tok = flops_per_token(cfg.model, cfg.data.seq_length)
        peak = peak_flops_per_device()
        at_interval = {**peak_memory_over_ranks(self.world_size), **router_bias_stats(self.raw_model),
                       **router_entropy_stats(self.raw_model)}
        records = self.read_step_metrics(pending)
        for raw, out in zip(pending, records):
            step, dt = raw["step"], raw["step_time_s"]
            out.update(kind="train", step=step, consumed_samples=sampler.consumed_samples(step),
                       step_time_s=dt, tokens_per_s=tokens_per_step / dt)
            out["mfu"] = (flops_tok * tokens_per_step / dt / (peak * self.world_size)) if peak else None
            out["tflops_per_gpu"] = flops_tok * tokens_per_step / dt / self.world_size / 1e12
            out.update(raw["memory"])
            if raw is pending[-1]:
                out.update(at_interval)
            logger.log(out, scalars=step % cfg.log.interval == 0)
            if out["loss_tokens"] == 0:  # nothing supervised in this global batch
                self._print(f"step {step}: no supervised tokens (loss_mask all 0); update skipped")
            elif out["skipped"]:
                self.nonfinite_in_a_row += 1
                self._print(f"step {step}: non-finite loss {out['loss']} or grad norm "
                            f"{out['grad_norm']}; update skipped ({self.nonfinite_in_a_row} in a row)")
                if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                    last = latest_checkpoint(cfg.checkpoint_dir)
                    raise NonFiniteError(
                        f"{self.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}) at step {step}; stopping. Last good checkpoint: "
                        f"{last if last else 'none'}")
            else:
                self.nonfinite_in_a_row = 0
                self.summary["first"] = self.summary["first"] or dict(out)
                self.summary["last"] = dict(out)
        out = records[-1]
        if bar is not None:
            bar.set_postfix(loss=_fmt(out["loss"]), lr=f"{out['lr']:.2e}", tok_s=f"{out['tokens_per_s']:.0f}")
        elif out["step"] % cfg.log.interval == 0:
            self._print(f"step {out['step']}/{t.steps} loss {_fmt(out['loss'])} lr {out['lr']:.2e} "
                        f"tokens/s {out['tokens_per_s']:.0f}")

    # ---- validation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset) -> Dict:
        t = self.cfg.train
        n = t.eval_iters * t.global_batch_size
        sampler = batching.GlobalBatchSampler(len(dataset), n, t.micro_batch_size, self.dp_rank, self.dp_size)
        batches = self._engine_batches(batching.load_micro_batches(dataset, sampler.micro_batches(0), self.device))
        counts = self._dp_sum(sum(role_counts(mb["roles"]) for mb in batches).to(self.device))
        self.pm.train(False)
        try:
            with self._autocast():
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
        train_set, valid_set = self._build_datasets()
        self.byte_lengths = self._byte_lengths()
        if self.byte_lengths is not None:
            self.byte_lengths = self.byte_lengths.to(self.device)
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
        preemption = PreemptionHandler().install()
        bar = None
        if self.is_main and cfg.log.progress_bar and not self.quiet and sys.stderr.isatty():  # else: step lines
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.summary = {"start_step": self.step, "first": None, "last": None, "valid": None}
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
                    self._print(f"preempted: saved {path} at step {self.step}; exiting with {EXIT_REQUEUE} (requeue)")
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
                if self.step % cfg.log.interval == 0 or evaluating or saving:
                    self._flush_metrics(pending, logger, bar, sampler)
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
        self.memory.write(cfg.run.dir, self.world_size, self._gather_objects if self.world_size > 1 else None)
        self.summary.update(steps_run=self.step - start_step, elapsed_s=elapsed,
                            tokens_per_s=(self.step - start_step) * t.global_batch_size * cfg.data.seq_length / max(elapsed, 1e-9))
        self._print_summary()
        return exit_code

    def _print_summary(self) -> None:
        s = self.summary
        if not (self.is_main and not self.quiet):
            return

        def fmt(rec):
            if not rec:
                return "n/a"
            bpb = rec.get("bits_per_byte")
            return f"step {rec['step']} loss {rec['loss']:.4f}" + (f" bits/byte {bpb:.4f}" if bpb else "")

        lines = [f"trained steps {s['start_step']}..{self.step} in {s['elapsed_s']:.1f}s "
                 f"({s['tokens_per_s']:.0f} tokens/s)",
                 f"  first: {fmt(s['first'])}", f"  last:  {fmt(s['last'])}"]
        if s["valid"]:
            lines.append(f"  valid: {fmt(s['valid'])}")
        lines.append(f"  checkpoints: {self.cfg.checkpoint_dir}  metrics: {self.cfg.run.dir}/metrics.jsonl")
        print("\n".join(lines), flush=True)
