"""What one bf16 optimizer step dispatches: parameter casts, fp32 gradient adds and aten ops, old vs new.

A ``TorchDispatchMode`` counter over one optimizer step (after one warm-up step) of
``examples/configs/tiny-cpu.yaml`` at ``train.precision: bf16`` (random tokens, 4 micro-batches of
the config's micro-batch size), run through the trainer's own ``train_step``, for both precision
paths in one process, same seed and batches:

- ``old`` (``train.master_weights: false``): fp32 parameters, autocast casts them at every use;
- ``new`` (``train.master_weights: true``): bf16 working weights cast once per step from the fp32
  master, gradients accumulated into fp32 slots (``megatron_vpmoe/parallel/mixed_precision.py``).

Counted: **parameter-shaped fp32->bf16 cast bytes** (the bf16 bytes written by ``_to_copy`` /
``copy_`` / ``_foreach_copy_`` from an fp32 tensor of a parameter's shape) over the rank's bf16
parameter bytes (every parameter at 2 bytes; target <= 1.0x), **fp32 parameter-sized add_**
(gradient accumulation into an fp32 tensor of a parameter's shape), and every aten op dispatched.
Writes ``benchmarks/results/casts.{json,md}`` (``--out DIR`` elsewhere).

    python benchmarks/casts.py [--micro-batches 4] [--seq N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megatron_vpmoe.utils.atomic import atomic_write_text  # noqa: E402

aten = torch.ops.aten
CASTS = {aten._to_copy.default, aten.copy_.default, aten._foreach_copy_.default}


class StepCounter(TorchDispatchMode):
    """Counts aten ops, parameter-shaped fp32->bf16 cast bytes and fp32 parameter-sized ``add_``."""

    def __init__(self, params):
        super().__init__()
        self.shapes = {tuple(p.shape) for p in params}
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.ops: Counter = Counter()
        self.cast_bytes = self.casts = 0  # any fp32 tensor of a parameter's shape
        self.weight_cast_bytes = self.weight_casts = 0  # reading a parameter's own (fp32) storage
        self.fp32_adds = 0

    def _cast(self, src, out) -> None:
        if (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == torch.float32
                and out.dtype == torch.bfloat16 and tuple(src.shape) in self.shapes):
            self.cast_bytes += out.numel() * out.element_size()
            self.casts += 1
            if src.untyped_storage().data_ptr() in self.storages:
                self.weight_cast_bytes += out.numel() * out.element_size()
                self.weight_casts += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops[str(func.overloadpacket.__name__)] += 1
        if func is aten._to_copy.default:
            self._cast(args[0], out)
        elif func is aten.copy_.default:
            self._cast(args[1], args[0])
        elif func is aten._foreach_copy_.default:
            for dst, src in zip(args[0], args[1]):
                self._cast(src, dst)
        elif func is aten.add_.Tensor:
            self_ = args[0]
            if self_.dtype == torch.float32 and tuple(self_.shape) in self.shapes:
                self.fp32_adds += 1
        return out


def _config(args, master_weights: bool):
    from megatron_vpmoe.config import load_config

    mb = args.micro_batch
    return load_config(ROOT / "examples" / "configs" / "tiny-cpu.yaml", [
        "data.tokenizer=null", "data.mock=true", f"data.seq_length={args.seq}",
        "train.precision=bf16", f"train.master_weights={str(master_weights).lower()}",
        f"train.micro_batch_size={mb}", f"train.global_batch_size={mb * args.micro_batches}",
        "train.steps=4", "train.schedule.warmup_steps=1", f"run.dir={args.out / 'run'}", "log.progress_bar=false"])


def _batches(cfg, micro_batches: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s, b = cfg.data.seq_length, cfg.train.micro_batch_size
    out = []
    for _ in range(micro_batches):
        ids = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:],
                    "loss_mask": torch.full((b, s), 3, dtype=torch.uint8),
                    "position_ids": torch.arange(s).expand(b, s)})
    return out


def measure(args, master_weights: bool) -> dict:
    """One counted optimizer step (after one warm-up step) of the given precision path."""
    from megatron_vpmoe.training.trainer import Trainer

    cfg = _config(args, master_weights)
    trainer = Trainer(cfg, datasets=([], []), quiet=True)
    trainer.byte_lengths = None
    trainer.log.read([trainer.train_step(_batches(cfg, args.micro_batches, 0))])
    params = list(trainer.raw_model.parameters())
    bf16_bytes = sum(p.numel() for p in params) * 2
    counter = StepCounter(params)
    with counter:
        raw = trainer.train_step(_batches(cfg, args.micro_batches, 1))
    (record,) = trainer.log.read([raw])
    return {"master_weights": master_weights, "loss": record["loss"],
            "weight_cast_bytes": counter.weight_cast_bytes, "weight_casts": counter.weight_casts,
            "weight_cast_ratio": counter.weight_cast_bytes / bf16_bytes,
            "param_shaped_cast_bytes": counter.cast_bytes, "param_shaped_casts": counter.casts,
            "bf16_param_bytes": bf16_bytes, "cast_ratio": counter.cast_bytes / bf16_bytes,
            "fp32_param_sized_add_": counter.fp32_adds, "aten_ops": sum(counter.ops.values()),
            "top_ops": dict(counter.ops.most_common(8))}


def _writer():
    """``benchmarks/preprocess.py``'s ``write_results`` (the results writer of the benchmarks)."""
    spec = importlib.util.spec_from_file_location("_bench_preprocess", ROOT / "benchmarks" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_results


def render(result: dict) -> list:
    old, new = result["old"], result["new"]
    lines = ["# Casts and ops per bf16 optimizer step (benchmarks/casts.py)", "",
             f"`examples/configs/tiny-cpu.yaml`, `train.precision: bf16`, seq {result['seq']}, "
             f"{result['micro_batches']} micro-batches of {result['micro_batch']}, one step after a warm-up "
             f"step, counted with a `TorchDispatchMode` (torch {result['torch']}, CPU).", "",
             "| path | weight casts (from a parameter's storage) | their bytes / bf16 param bytes "
             "| param-shaped fp32->bf16 casts (any tensor) | their bytes / bf16 param bytes | fp32 param-sized add_ "
             "| aten ops per step | loss |", "|---|---|---|---|---|---|---|---|"]
    for name, r in (("old: autocast over fp32 weights (`master_weights: false`)", old),
                    ("new: bf16 weights, fp32 master (`master_weights: true`)", new)):
        lines.append(f"| {name} | {r['weight_casts']} | **{r['weight_cast_ratio']:.2f}x** | "
                     f"{r['param_shaped_casts']} | **{r['cast_ratio']:.2f}x** | "
                     f"{r['fp32_param_sized_add_']} | {r['aten_ops']} | {r['loss']:.5f} |")
    lines += ["", f"bf16 parameter bytes of the rank: {new['bf16_param_bytes']}; target <= 1.0x for the weights' casts.",
              "The weights' casts read a parameter's own fp32 storage (autocast's per-use casts; the new path's one "
              "`_foreach_copy_` per step; 1-D parameters and the routers stay fp32). The parameter-shaped column also counts every other fp32 tensor of a "
              "parameter's shape: weight gradients computed in fp32 inside an op (the LM head's chunked weight "
              "gradient) cast to the bf16 parameter's dtype before the hook adds them into the fp32 slot, and activations that happen to share a parameter's shape ([4 x 128 tokens, 128] = "
              "the dense MLP's [512, 128] weight: the router's `tokens.float()` and its gradient)."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch (tiny-cpu's)")
    ap.add_argument("--seq", type=int, default=128, help="sequence length (tiny-cpu's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write casts.{json,md} here instead of benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result_dir = args.out
        args.out = Path(tmp)
        result = {"seq": args.seq, "micro_batches": args.micro_batches, "micro_batch": args.micro_batch,
                  "torch": torch.__version__, "old": measure(args, False), "new": measure(args, True)}
    lines = render(result)
    if result_dir is None:
        _writer()("casts", result, lines)
    else:
        result_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(result_dir / "casts.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(result_dir / "casts.md", "\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
