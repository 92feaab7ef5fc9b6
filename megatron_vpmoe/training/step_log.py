"""The trainer's step log: device results of many steps read back at once, by name, into records; skips; the summary.

``Trainer.train_step`` returns device tensors (nothing read back); at the log interval
:meth:`StepLog.flush` packs the pending steps' rows (:data:`STEP_ROW`) into one tensor, reads it
once, unpacks each field by name into a ``metrics.jsonl`` record with rates and memory, reports
skipped steps and stops the run after ``train.max_nonfinite_steps`` non-finite steps in a row.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from megatron_vpmoe.training.checkpoint import latest_checkpoint
from megatron_vpmoe.training.loss import NUM_ROLES, ROLE_NAMES, bits_per_byte
from megatron_vpmoe.training.metrics import (
    flops_per_token,
    peak_flops_per_device,
    peak_memory_over_ranks,
    router_bias_stats,
    router_entropy_stats,
)
from megatron_vpmoe.training.step_stats import Fields
from megatron_vpmoe.training.summary import SMOOTH_FRACTION, describe, smoothed_ends
from megatron_vpmoe.utils.errors import VpmoeError

# one micro-batch's statistics from the loss hook, summed by the engine over micro-batches and ranks:
# the objective's NLL part, the MoE aux loss (filled by the step), the NLL sum per role, the counted bytes
LOSS_STATS = Fields(nll=1, aux=1, role_nll=NUM_ROLES, bytes=1)
# one step's row of device values, read back for many steps in one transfer (load: experts per layer)
STEP_ROW = Fields(counts=NUM_ROLES, stats=LOSS_STATS.size, grad_norm=1, finite=1, load=None)


class NonFiniteError(VpmoeError):
    """Too many non-finite steps in a row."""


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class StepLog:
    """Turns the trainer's pending step results into log records (see the module docstring)."""

    def __init__(self, cfg, world_size: int, raw_model: torch.nn.Module, printer: Callable[[str], None]):
        self.cfg, self.world_size, self.raw_model, self._print = cfg, world_size, raw_model, printer
        self.byte_lengths: Optional[torch.Tensor] = None  # bytes per token id: bits per byte when known
        self.nonfinite_in_a_row = 0  # consecutive skipped non-finite steps (saved with checkpoints)
        self.summary: Dict = {}
        self.start(0)

    def start(self, step: int) -> None:
        """A run (or its resumed part) starts at ``step``: the summary starts over."""
        self.summary = {"start_step": step, "first": None, "last": None, "valid": None, "steps": []}

    def read(self, steps: List[Dict]) -> List[Dict]:
        """Log records of ``Trainer.train_step`` results, read back from the device in one transfer."""
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

    def flush(self, pending: List[Dict], logger, bar, sampler, interval_stats: bool = True) -> None:
        """Read the pending steps' metrics (one host read), log them, report skipped steps and
        stop after ``train.max_nonfinite_steps`` non-finite steps in a row; with ``interval_stats``
        the last step also gets the interval's peak memory (gathered over ranks) and router
        statistics. Every rank calls it at the same steps with the same ``interval_stats``."""
        if not pending:
            return
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = t.global_batch_size * cfg.data.seq_length
        flops_tok = flops_per_token(cfg.model, cfg.data.seq_length)
        peak = peak_flops_per_device()
        at_interval = {**peak_memory_over_ranks(self.world_size), **router_bias_stats(self.raw_model),
                       **router_entropy_stats(self.raw_model)} if interval_stats else {}
        records = self.read(pending)
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
                self.summary["steps"].append({k: out.get(k) for k in ("step", "loss", "bits_per_byte")})
        out = records[-1]
        if bar is not None:
            bar.set_postfix({"loss": _fmt(out["loss"]), "tok_s": f"{out['tokens_per_s']:.0f}", "lr": f"{out['lr']:.2e}"})
        elif out["step"] % cfg.log.interval == 0 or out["step"] == self.summary["start_step"] + 1:
            self._print(f"step {out['step']}/{t.steps} loss {_fmt(out['loss'])} lr {out['lr']:.2e} "
                        f"tokens/s {out['tokens_per_s']:.0f}")

    def summary_text(self, step: int) -> str:
        """The end-of-run lines: steps and throughput, first/last/validation losses, where outputs are."""
        s = self.summary

        def fmt(rec):
            if not rec:
                return "n/a"
            bpb = rec.get("bits_per_byte")
            return f"step {rec['step']} loss {rec['loss']:.4f}" + (f" bits/byte {bpb:.4f}" if bpb else "")

        ends = smoothed_ends(s["steps"])
        lines = [f"trained steps {s['start_step']}..{step} in {s['elapsed_s']:.1f}s "
                 f"({s['tokens_per_s']:.0f} tokens/s); first/last: means over the first/last "
                 f"{SMOOTH_FRACTION:.0%} of the steps",
                 f"  first: {describe(ends['first'])}", f"  last:  {describe(ends['last'])}"]
        if s["valid"]:
            lines.append(f"  valid: {fmt(s['valid'])}")
        lines.append(f"  checkpoints: {self.cfg.checkpoint_dir}  metrics: {self.cfg.run.dir}/metrics.jsonl")
        return "\n".join(lines)
