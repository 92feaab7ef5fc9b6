"""The tokenizer experiment's report: one table over variants, ``report.json`` and plots.

Columns: vocabulary, tokens per character, sequence-length inflation against the reference
variant, embedding+head parameters and their share of active parameters, the (equal) active
non-embedding parameters, steps and bytes seen, final training loss and bits per byte, loss
spikes, validation and eval bits per byte, benchmark scores, long-context degradation, wall
time. Plots: training loss against bytes seen, long-context loss per position, scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from megatron_vpmoe.utils.atomic import atomic_write_text


def _reference(rows: List[Dict]) -> Dict:
    marked = [r for r in rows if r.get("reference")]
    return marked[0] if marked else rows[0]


def add_derived(rows: List[Dict]) -> List[Dict]:
    ref = _reference(rows)
    for r in rows:
        # same text: tokens_v / tokens_ref = bytes_per_token_ref / bytes_per_token_v
        r["sequence_length_inflation"] = ref["bytes_per_token"] / r["bytes_per_token"]
    return rows


def _f(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown(rows: List[Dict]) -> str:
    ref = _reference(rows)
    tasks = sorted({t for r in rows for t in r["scores"]})
    head = ["variant", "vocab", "tokens/char", f"seq. inflation vs {ref['variant']}", "emb+head params",
            "emb+head / active", "active non-emb", "steps", "MB seen", "final loss", "train bpb", "spikes",
            "max grad norm", "valid bpb", "eval bpb", *tasks, "long-ctx degradation", "wall s"]
    lines = ["# Tokenizer experiment", "",
             "Same text budget (UTF-8 bytes) and the same active non-embedding parameters for every variant; "
             "only the vocabulary differs.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], _f(r["vocab_size"]), _f(r["tokens_per_char"], 4), _f(r["sequence_length_inflation"]),
                 _f(r["embedding_head_params"]), f"{r['embedding_head_share_of_active']:.1%}",
                 _f(r["active_non_embedding_params"]), _f(r["steps"]), _f(r["bytes_seen"] / 1e6, 2),
                 _f(r["final_train_loss"]), _f(r["final_train_bpb"]), _f(r["loss_spikes"]),
                 _f(r["max_grad_norm"]), _f(r["valid_bpb"]), _f(r["eval_bpb"]),
                 *[_f(r["scores"].get(t)) for t in tasks], _f(r["long_context_degradation"], 4),
                 _f(r["wall_time_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Stage wall time (s): " + "; ".join(
        f"{r['variant']}: " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["seconds"].items()) for r in rows), "",
        "Plots: `loss_vs_bytes.png`, `long_context.png`, `scores.png`.", ""]
    return "\n".join(lines)


def _plots(rows: List[Dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_vpmoe.eval.report import _save, plot_long_context

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in rows:
        xs = [p["bytes_seen"] / 1e6 for p in r["curve"]]
        axes[0].plot(xs, [p["loss"] for p in r["curve"]], label=r["variant"])
        axes[1].plot(xs, [p["bits_per_byte"] for p in r["curve"]], label=r["variant"])
    axes[0].set_ylabel("training loss (nats/token)")
    axes[1].set_ylabel("training bits per byte")
    for ax in axes:
        ax.set_xlabel("MB of text seen")
        ax.legend()
    fig.tight_layout()
    _save(fig, out / "loss_vs_bytes.png")

    curves = {r["variant"]: r["long_context"] for r in rows if r.get("long_context")}
    if curves:
        plot_long_context(curves, out / "long_context.png")

    tasks = sorted({t for r in rows for t in r["scores"]})
    if tasks:
        fig, ax = plt.subplots(figsize=(max(5, len(tasks) * 1.2), 3.5))
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            ax.bar([j + i * width for j in range(len(tasks))], [r["scores"].get(t) or 0 for t in tasks],
                   width, label=r["variant"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend()
        fig.tight_layout()
        _save(fig, out / "scores.png")


def write_experiment_report(rows: List[Dict], out: Path) -> Path:
    rows = add_derived(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(rows, indent=1) + "\n")
    _plots(rows, out)
    atomic_write_text(out / "report.md", markdown(rows))
    return out / "report.md"
