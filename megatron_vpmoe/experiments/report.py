"""The tokenizer experiment's report: mean ± std over seeds at equal bytes and equal FLOPs, stability, verdicts, plots.

Input: one summary row per (variant, seed) (:func:`.tokenizers.summarize_run`). Output
``report.json`` (the runs, per-variant mean/std of every metric, the comparisons against the
reference variant) and ``report.md`` with three tables — the equal-bytes budget (every variant
trained on the same UTF-8 bytes), the equal-FLOPs budget (every run read at the smallest total
training FLOPs any run reached: the planner's per-token FLOPs x tokens seen), stability (loss
spikes, max grad norm, expert load max/mean, router entropy) — and the verdicts: a difference
to the reference counts only when it exceeds ``SPREAD_FACTOR`` x the pooled seed standard
deviation, otherwise it is "not distinguishable". Plots: ``loss_vs_bytes.png``,
``loss_vs_flops.png`` (mean over seeds, ± std band), ``long_context.png``, ``scores.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from megatron_vpmoe.experiments.stats import SPREAD_FACTOR, compare, interpolate, mean_std
from megatron_vpmoe.utils.atomic import atomic_write_text

# (key, column title, digits, lower is better?) per table
BYTES_METRICS = [
    ("tokens_per_char", "tokens/char", 4, None), ("sequence_length_inflation", "seq. inflation", 3, None),
    ("embedding_head_share_of_active", "emb+head / active", 3, None), ("steps", "steps", 0, None),
    ("bytes_seen", "MB seen", 2, None), ("flops", "FLOPs", None, None),
    ("final_train_loss", "final loss (nats/token)", 3, None), ("final_train_bpb", "train bpb", 3, True),
    ("valid_bpb", "held-out bpb", 3, True), ("eval_bpb", "eval bpb", 3, True),
    ("long_context_degradation", "long-ctx degradation", 4, True),
]
FLOPS_METRICS = [
    ("bytes_seen_at_flops", "MB seen", 2, None), ("train_bpb_at_flops", "train bpb", 3, True),
    ("valid_bpb_at_flops", "validation bpb", 3, True),
]
STABILITY_METRICS = [
    ("loss_spikes", "loss spikes", 1, True), ("max_grad_norm", "max grad norm", 3, True),
    ("expert_load_max_over_mean", "expert load max/mean", 3, True),
    ("expert_load_max_over_mean_peak", "peak load max/mean", 3, True),
    ("router_entropy", "router entropy", 4, None), ("router_entropy_final", "final router entropy", 4, None),
]
SCALE = {"bytes_seen": 1e-6, "bytes_seen_at_flops": 1e-6}


def _reference(names: List[str], rows: List[Dict]) -> str:
    marked = [r["variant"] for r in rows if r.get("reference")]
    return marked[0] if marked else names[0]


def add_flops_budget(rows: List[Dict]) -> float:
    """Read every run at the smallest total FLOPs any run reached; returns that budget."""
    budget = min(r["flops"] for r in rows)
    for r in rows:
        xs = [p["flops"] for p in r["curve"]]
        r["train_bpb_at_flops"] = interpolate(xs, [p.get("bits_per_byte_smoothed") for p in r["curve"]], budget)
        r["bytes_seen_at_flops"] = budget / r["flops_per_token"] * r["bytes_per_token"]
        vx = [p["flops"] for p in r.get("valid_curve", [])]
        r["valid_bpb_at_flops"] = interpolate(vx, [p.get("bits_per_byte") for p in r.get("valid_curve", [])], budget)
    return budget


def aggregate(rows: List[Dict]) -> Dict:
    """Per variant: mean/std/n of every metric over its seeds, and comparisons to the reference."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    ref_bpt = {r["variant"]: r["bytes_per_token"] for r in rows}[_reference(names, rows)]
    for r in rows:  # same text: tokens_v / tokens_ref = bytes_per_token_ref / bytes_per_token_v
        r["sequence_length_inflation"] = ref_bpt / r["bytes_per_token"]
    budget = add_flops_budget(rows)
    tasks = sorted({t for r in rows for t in r["scores"]})
    keys = [m[0] for m in BYTES_METRICS + FLOPS_METRICS + STABILITY_METRICS]
    variants = {}
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        stats = {k: mean_std([r.get(k) for r in mine]) for k in keys}
        stats.update({f"score_{t}": mean_std([r["scores"].get(t) for r in mine]) for t in tasks})
        variants[name] = {"seeds": [r["seed"] for r in mine], "vocab_size": mine[0]["vocab_size"],
                          "documents_sha256": sorted({r["documents_sha256"] for r in mine}), "metrics": stats}
    ref = _reference(names, rows)
    lower = {k: low for k, _, _, low in BYTES_METRICS + FLOPS_METRICS + STABILITY_METRICS}
    lower.update({f"score_{t}": False for t in tasks})
    comparisons = []
    for name in names:
        if name == ref:
            continue
        for key, low in lower.items():
            if low is None:
                continue
            c = compare(variants[name]["metrics"][key], variants[ref]["metrics"][key])
            verdict = ("one seed: no spread" if c["distinguishable"] is None and c["diff"] is not None else
                       "-" if c["diff"] is None else "not distinguishable" if not c["distinguishable"] else
                       "better" if (c["diff"] < 0) == low else "worse")
            comparisons.append({"variant": name, "reference": ref, "metric": key, **c, "verdict": verdict})
    return {"reference": ref, "flops_budget": budget, "tasks": tasks, "variants": variants,
            "comparisons": comparisons, "spread_factor": SPREAD_FACTOR}


def _cell(stat: Dict, key: str, digits: int) -> str:
    if stat["mean"] is None:
        return "-"
    scale = SCALE.get(key, 1.0)
    if digits is None:  # wide range (FLOPs): three significant digits
        return f"{stat['mean']:.3g}" + (f" ± {stat['std']:.2g}" if stat["n"] > 1 else "")
    if stat["n"] < 2:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _table(agg: Dict, metrics: List[tuple]) -> List[str]:
    head = ["variant", *[m[1] for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in agg["variants"].items():
        lines.append("| " + " | ".join([name, *[_cell(v["metrics"][k], k, d) for k, _, d, _ in metrics]]) + " |")
    return lines


def markdown(rows: List[Dict], agg: Dict, onpolicy: Optional[Dict] = None) -> str:
    seeds = sorted({r["seed"] for r in rows})
    any_row = rows[0]
    tasks = agg["tasks"]
    lines = [
        "# Tokenizer experiment", "",
        f"{len(agg['variants'])} variants x {len(seeds)} seeds ({', '.join(map(str, seeds))}); cells are "
        f"mean ± standard deviation over seeds. Every variant trained on the same documents "
        f"(sha256 {any_row['documents_sha256'][:12]}, {any_row['train_documents_bytes']:,} bytes) with the "
        f"same active non-embedding parameters ({any_row['active_non_embedding_params']:,}); only the "
        f"vocabulary differs. Reference: {agg['reference']}.", "",
        "## Budget 1: equal bytes of text", "", *_table(agg, BYTES_METRICS
                                                         + [(f"score_{t}", t, 3, False) for t in tasks]), "",
        f"## Budget 2: equal training FLOPs ({agg['flops_budget']:.3g} FLOPs per run: the smallest "
        f"total any run reached; each run read there on its curves)", "", *_table(agg, FLOPS_METRICS), "",
        "## Stability and routing", "", *_table(agg, STABILITY_METRICS), "",
        f"## Verdicts against {agg['reference']}", "",
        f"A difference counts when |mean difference| > {agg['spread_factor']:g} x the pooled seed standard "
        f"deviation sqrt((s_a^2 + s_b^2) / 2); otherwise it is not distinguishable from seed noise.", "",
        "| variant | metric | difference | seed spread | verdict |", "|---|---|---|---|---|"]
    for c in agg["comparisons"]:
        if c["diff"] is None:
            continue
        spread = "-" if c["spread"] is None else f"{c['spread']:.4f}"
        lines.append(f"| {c['variant']} | {c['metric']} | {c['diff']:+.4f} | {spread} | {c['verdict']} |")
    if onpolicy:
        lines += ["", "## On-policy distillation of the best variant", "",
                  f"Student: {onpolicy['variant']} seed {onpolicy['seed']} (lowest held-out bpb); teacher: "
                  f"{onpolicy['teacher']}; {onpolicy['steps']} on-policy steps.", "",
                  "| teacher score | before (first quarter of the steps) | after (last quarter) |", "|---|---|---|",
                  f"| mean teacher score of the student's sampled answers | "
                  f"{onpolicy['score_before']:.4f} | {onpolicy['score_after']:.4f} |"]
    lines += ["", "Per-run stage wall time (s): " + "; ".join(
        f"{r['variant']}/{r['seed']}: " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in r["seconds"].items())
        for r in rows), "",
        "Plots: `loss_vs_bytes.png`, `loss_vs_flops.png`, `long_context.png`, `scores.png`.", ""]
    return "\n".join(lines)


def _mean_curve(runs: List[Dict], x: str, y: str):
    """Pointwise mean and std over a variant's seeds (their steps coincide)."""
    n = min(len(r["curve"]) for r in runs)
    xs = [sum(r["curve"][i][x] for r in runs) / len(runs) for i in range(n)]
    ys = [mean_std([r["curve"][i].get(y) for r in runs]) for i in range(n)]
    keep = [i for i in range(n) if ys[i]["mean"] is not None]
    return ([xs[i] for i in keep], [ys[i]["mean"] for i in keep], [ys[i]["std"] for i in keep])


def _plots(rows: List[Dict], agg: Dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_vpmoe.eval.report import _save, plot_long_context

    for x, scale, label, name in (("bytes_seen", 1e-6, "MB of text seen", "loss_vs_bytes.png"),
                                  ("flops", 1e-12, "training TFLOPs", "loss_vs_flops.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for variant in agg["variants"]:
            mine = [r for r in rows if r["variant"] == variant]
            for ax, y in zip(axes, ("loss", "bits_per_byte_smoothed")):
                xs, ms, ss = _mean_curve(mine, x, y)
                xs = [v * scale for v in xs]
                line, = ax.plot(xs, ms, label=variant)
                ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)],
                                color=line.get_color(), alpha=0.2)
            for r in mine:  # validation points of every seed
                vc = r.get("valid_curve", [])
                axes[1].scatter([p[x] * scale for p in vc], [p.get("bits_per_byte") for p in vc], s=8,
                                color=line.get_color(), marker="x")
        if x == "flops":
            for ax in axes:
                ax.axvline(agg["flops_budget"] * scale, color="grey", lw=0.8, ls="--")
        axes[0].set_ylabel("training loss (nats/token)")
        axes[1].set_ylabel("bits per byte (train smoothed; x: validation)")
        for ax in axes:
            ax.set_xlabel(label)
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / name)

    curves = {f"{r['variant']}/{r['seed']}": r["long_context"] for r in rows if r.get("long_context")}
    if curves:
        plot_long_context(curves, out / "long_context.png")
    tasks = agg["tasks"]
    if tasks:
        names = list(agg["variants"])
        fig, ax = plt.subplots(figsize=(max(5, len(tasks) * 1.5), 3.5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            stats = [agg["variants"][name]["metrics"][f"score_{t}"] for t in tasks]
            ax.bar([j + i * width for j in range(len(tasks))], [s["mean"] or 0 for s in stats], width,
                   yerr=[s["std"] or 0 for s in stats], label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (mean ± std over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / "scores.png")


def write_experiment_report(rows: List[Dict], out: Path, onpolicy: Optional[Dict] = None) -> Path:
    agg = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps({"runs": rows, **agg, "onpolicy": onpolicy}, indent=1) + "\n")
    _plots(rows, agg, out)
    atomic_write_text(out / "report.md", markdown(rows, agg, onpolicy))
    return out / "report.md"
