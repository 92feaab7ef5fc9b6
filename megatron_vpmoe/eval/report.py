"""Evaluation results on disk: ``results.json``, a Markdown table and PNG plots.

Everything is written atomically (temporary name, then rename). Plots use matplotlib's Agg
backend, so no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from megatron_vpmoe.utils.atomic import atomic_file, atomic_write_text

# the headline metric of each kind of task, in table order
HEADLINE = ("bpb", "exact_match", "acc", "acc_norm", "ppl", "chance", "degradation")


def markdown_table(results: Dict[str, object]) -> str:
    """One row per task: its headline metrics, items scored and seconds."""
    tasks: Dict[str, dict] = results["tasks"]  # type: ignore[assignment]
    cols = [c for c in HEADLINE if any(c in m for m in tasks.values())]
    lines = [f"# Evaluation of `{results.get('model')}`", "",
             "| task | " + " | ".join(cols) + " | n | seconds |",
             "|---|" + "---:|" * (len(cols) + 2)]
    for name, metrics in tasks.items():
        cells = [_fmt(metrics.get(c)) for c in cols]
        secs = results.get("seconds", {}).get(name)  # type: ignore[union-attr]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {metrics.get('n', '')} | {_fmt(secs, 1)} |")
    long = tasks.get("long_context")
    if long:
        lines += ["", f"Long context (training context {long['context']}, read to {long['length']}):", "",
                  "| positions | mean loss (nats) |", "|---|---:|"]
        lines += [f"| {b['start']}-{b['end']} | {b['loss']:.4f} |" for b in long["buckets"]]
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plot_scores(results: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: Dict[str, dict] = results["tasks"]  # type: ignore[assignment]
    names, scores, chances = [], [], []
    for name, m in tasks.items():
        key = "exact_match" if "exact_match" in m else "acc" if "acc" in m else None
        if key:
            names.append(name)
            scores.append(m[key])
            chances.append(m.get("chance", 0.0))
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 1), 3.5))
    ax.bar(names, scores, color="tab:blue", label="score")
    ax.scatter(names, chances, color="tab:red", marker="_", s=400, label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper right")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    _save(fig, path)


def plot_long_context(curves: Dict[str, dict], path: Path) -> None:
    """Loss per position bucket for one or more models (``{label: long_context metrics}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    context = None
    for label, long in curves.items():
        mids = [(b["start"] + b["end"]) / 2 for b in long["buckets"]]
        ax.plot(mids, [b["loss"] for b in long["buckets"]], marker="o", label=label)
        context = long["context"]
    if context:
        ax.axvline(context, color="gray", linestyle="--", label="training context")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def write_results(results: Dict[str, object], out_dir: Path) -> List[Path]:
    """``results.json``, ``results.md``, ``scores.png`` and ``long_context.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "results.md"]
    atomic_write_text(written[0], json.dumps(results, indent=2) + "\n")
    atomic_write_text(written[1], markdown_table(results))
    plot_scores(results, out_dir / "scores.png")
    if (out_dir / "scores.png").exists():
        written.append(out_dir / "scores.png")
    long = results["tasks"].get("long_context")  # type: ignore[union-attr]
    if long:
        label = Path(str(results.get("model"))).name or str(results.get("model"))
        plot_long_context({label: long}, out_dir / "long_context.png")
        written.append(out_dir / "long_context.png")
    return written
