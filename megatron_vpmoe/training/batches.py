"""Deterministic global batches: which samples each rank reads at each step, and collation.

Step ``s`` reads the global sample indices ``[s*G, (s+1)*G)`` (``G`` = global batch size,
wrapping around a dataset shorter than that); data-parallel rank ``r`` of ``D`` takes the
``r``-th contiguous ``G/D`` of them and splits it into micro-batches. The position in the data
is therefore just ``consumed_samples = step * G``, which the checkpoint stores, and it stays
valid when a run resumes with a different number of data-parallel ranks.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from megatron_vpmoe.training.loss import check_roles, roles_from_loss_mask
from megatron_vpmoe.utils.errors import VpmoeError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch_size} is not divisible by "
                             f"micro batch {micro_batch_size} x data-parallel {dp_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def consumed_samples(self, step: int) -> int:
        return step * self.global_batch_size

    def micro_batches(self, step: int) -> List[List[int]]:
        """This rank's sample indices at ``step``, one list per micro-batch."""
        per_rank = self.global_batch_size // self.dp_size
        start = step * self.global_batch_size + self.dp_rank * per_rank
        idx = [(start + i) % self.num_samples for i in range(per_rank)]
        m = self.micro_batch_size
        return [idx[i:i + m] for i in range(0, per_rank, m)]


def collate(samples: Sequence[Dict[str, torch.Tensor]], device=None) -> Dict[str, torch.Tensor]:
    """Stack dataset items (dicts of tensors, numpy arrays accepted) into a micro-batch."""
    out = {}
    for key in BATCH_KEYS:
        if key not in samples[0]:
            continue
        out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
        if device is not None:
            out[key] = out[key].to(device, non_blocking=True)
    for key in ("tokens", "labels"):
        if key not in out:
            raise KeyError(f"dataset items need '{key}' (have {sorted(samples[0])})")
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    if "loss_mask" not in out:
        out["loss_mask"] = torch.ones_like(out["labels"], dtype=torch.float32)
    check_roles(out["loss_mask"])
    return out


class StepMicroBatches(torch.utils.data.Sampler):
    """Batch sampler over steps ``[start, end)``: yields this rank's micro-batch index lists in order."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, end: int):
        self.sampler, self.start, self.end = sampler, start, end

    def __iter__(self):
        for step in range(self.start, self.end):
            yield from self.sampler.micro_batches(step)

    def __len__(self):
        return max(0, self.end - self.start) * self.sampler.accumulation_steps


def _ignore_preemption_signals(worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn signature
    """Reader workers leave SIGTERM/SIGUSR1 (sent to the whole job by SLURM) to the trainer, which
    checkpoints and then shuts them down; otherwise a preemption would kill them mid-step."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def micro_batch_loader(dataset, sampler: GlobalBatchSampler, start: int, end: int, num_workers: int = 0):
    """A ``DataLoader`` yielding this rank's collated micro-batches for steps ``[start, end)``;
    ``num_workers`` > 0 reads ahead in worker processes (the order stays deterministic).

    The loader gets its own generator: creating its iterator draws a base seed, and drawing it
    from the global torch RNG would shift dropout after a resume (the RNG is restored first)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepMicroBatches(sampler, start, end), collate_fn=collate,
        num_workers=num_workers, persistent_workers=False, prefetch_factor=4 if num_workers else None,
        worker_init_fn=_ignore_preemption_signals if num_workers else None,
        generator=torch.Generator().manual_seed(start))


def load_micro_batches(dataset, indices: List[List[int]], device=None) -> List[Dict[str, torch.Tensor]]:
    return [collate([dataset[i] for i in chunk], device) for chunk in indices]


def engine_batches(micro_batches: List[Dict[str, torch.Tensor]], pipeline: bool,
                   default_positions: Callable[[torch.Tensor], torch.Tensor]) -> List[Dict]:
    """The data's micro-batches as the engine takes them (``input_ids``, ``labels``, ``position_ids``,
    label ``roles``); under a pipeline (``pipeline``) positions must be the default 0..S-1."""
    out = []
    for mb in micro_batches:
        positions = mb.get("position_ids")
        if pipeline and positions is not None:
            if not torch.equal(positions, default_positions(mb["tokens"])):
                raise VpmoeError("pipeline parallelism uses positions 0..S-1; this data has "
                                 "other position_ids (documents reset positions)")
            positions = None
        out.append({"input_ids": mb["tokens"], "labels": mb["labels"], "position_ids": positions,
                    "roles": roles_from_loss_mask(mb["loss_mask"])})
    return out
