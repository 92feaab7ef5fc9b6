"""Side-by-side evaluation of tokenizer directories on text: compression, sequence lengths,
embedding + head cost, byte fallback, round-trip exactness, encode throughput; JSON + Markdown
+ PNG plots (``vpmoe tokenizer eval``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from megatron_vpmoe.tokenizers.base import Tokenizer
from megatron_vpmoe.tokenizers.loader import load
from megatron_vpmoe.tokenizers.corpus import chunk_documents, load_documents
from megatron_vpmoe.utils.atomic import atomic_file, atomic_write_text

PERCENTILES = (50, 90, 99)
CHUNK_CHARS = 16384


def _partial_char(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def evaluate_tokenizer(tok: Tokenizer, docs: Sequence[str], *, hidden_size: int = 1024,
                       seq_length: int = 4096) -> dict:
    """Metrics of one tokenizer on ``docs`` (each document encoded in ~16k-character chunks
    cut at line breaks; a document's length is the sum over its chunks)."""
    chunks: List[str] = []
    owner: List[int] = []
    for d, doc in enumerate(docs):
        for chunk in chunk_documents([doc], CHUNK_CHARS):
            chunks.append(chunk)
            owner.append(d)
    n_chars = sum(len(c) for c in chunks)
    n_bytes = sum(len(c.encode("utf-8")) for c in chunks)
    start = time.perf_counter()
    encoded = [tok.encode(c) for c in chunks]  # one thread, one chunk at a time: comparable
    seconds = time.perf_counter() - start
    n_tokens = sum(len(e) for e in encoded)
    roundtrip = all(tok.decode(e) == c for e, c in zip(encoded, chunks))
    doc_lengths = np.zeros(len(docs), dtype=np.int64)
    np.add.at(doc_lengths, np.asarray(owner, dtype=np.int64), [len(e) for e in encoded])
    pieces = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    partial = np.array([_partial_char(p) if p else False for p in pieces])
    counts = np.bincount(np.concatenate([np.asarray(e, dtype=np.int64) for e in encoded if e] or
                                        [np.zeros(0, dtype=np.int64)]), minlength=tok.vocab_size)
    padded = tok.padded_vocab_size()
    return {
        "name": tok.name, "kind": tok.kind, "encoder": tok.metadata.get("encoder"),
        "vocab_size": tok.vocab_size, "padded_vocab_size": padded,
        "tokens": int(n_tokens), "chars": n_chars, "bytes": n_bytes,
        "tokens_per_char": n_tokens / max(1, n_chars), "tokens_per_byte": n_tokens / max(1, n_bytes),
        "bytes_per_token": n_bytes / max(1, n_tokens),
        "embedding_head_params": 2 * padded * hidden_size, "hidden_size": hidden_size,
        "roundtrip_exact": bool(roundtrip), "encode_mb_per_s": n_bytes / 1e6 / max(seconds, 1e-9),
        "byte_fallback_rate": float(counts[: len(partial)][partial].sum() / max(1, n_tokens)),
        "vocab_used_fraction": float((counts > 0).sum() / tok.vocab_size),
        "seq_length": seq_length,
        "doc_length_percentiles": {f"p{p}": float(np.percentile(doc_lengths, p)) for p in PERCENTILES},
        "doc_length_max": int(doc_lengths.max()) if len(doc_lengths) else 0,
        "docs_fitting_seq_length": float((doc_lengths <= seq_length).mean()) if len(doc_lengths) else 0.0,
        "sequences_at_seq_length": int(-(-n_tokens // seq_length)),
        "_doc_lengths": doc_lengths.tolist(),
    }


def _plots(rows: List[dict], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def figure(name: str, size, draw) -> None:
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    def compression(ax):
        ax.bar([r["name"] for r in rows], [r["tokens_per_char"] for r in rows], color="tab:blue")
        ax.set_ylabel("tokens per character")
        ax.set_title("compression (lower is better)")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")

    def params(ax):
        for r in rows:
            ax.scatter(r["embedding_head_params"] / 1e6, r["tokens_per_char"], label=r["name"])
        ax.set_xlabel(f"embedding + head params (M, hidden {rows[0]['hidden_size']}, untied)")
        ax.set_ylabel("tokens per character")
        ax.legend(fontsize=7)

    def lengths(ax):
        seq = rows[0]["seq_length"]
        top = max(max(r["_doc_lengths"] or [1]) for r in rows)
        bins = np.linspace(0, max(top, seq) * 1.05, 40)
        for r in rows:
            ax.hist(r["_doc_lengths"], bins=bins, histtype="step", label=r["name"])
        ax.axvline(seq, color="k", linestyle="--", linewidth=1, label=f"context {seq}")
        ax.set_xlabel("tokens per document")
        ax.set_ylabel("documents")
        ax.legend(fontsize=7)

    figure("tokens_per_char.png", (max(4, 1.2 * len(rows)), 3.2), compression)
    figure("params_vs_compression.png", (5, 3.5), params)
    figure("doc_lengths.png", (5.5, 3.5), lengths)
    return written


def _markdown(rows: List[dict], inputs: Sequence[str], plots: List[str]) -> str:
    base = rows[0]
    lines = [
        "# Tokenizer evaluation", "",
        f"Input: {', '.join(map(str, inputs))} ({base['chars']:,} characters, {base['bytes']:,} bytes). "
        f"Embedding + head parameters are untied, hidden {base['hidden_size']}, vocab padded to 128. "
        f"Relative tokens/char is against the first tokenizer ({base['name']}).", "",
        "| name | kind | vocab | tokens/char | vs first | tokens/byte | bytes/token | emb+head params | "
        "byte fallback | round-trip | encode MB/s | doc p50 / p90 / p99 tokens | docs ≤ context |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["doc_length_percentiles"]
        lines.append(
            f"| {r['name']} | {r['kind']}{' (' + r['encoder'] + ')' if r['encoder'] else ''} | {r['vocab_size']:,} | "
            f"{r['tokens_per_char']:.4f} | "
            f"{100 * (r['tokens_per_char'] / base['tokens_per_char'] - 1):+.1f}% | {r['tokens_per_byte']:.4f} | "
            f"{r['bytes_per_token']:.2f} | {r['embedding_head_params'] / 1e6:.1f}M | "
            f"{100 * r['byte_fallback_rate']:.3f}% | {'yes' if r['roundtrip_exact'] else 'NO'} | "
            f"{r['encode_mb_per_s']:.2f} | {p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f} | "
            f"{100 * r['docs_fitting_seq_length']:.0f}% |")
    lines += ["", "Byte fallback: share of tokens that are not whole UTF-8 characters on their own.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def evaluate_tokenizers(tokenizer_dirs: Sequence[str], inputs: Sequence[str], report_dir: str, *,
                        hidden_size: int = 1024, seq_length: int = 4096,
                        max_bytes: Optional[int] = None) -> List[dict]:
    """Evaluate every tokenizer directory on ``inputs``; write ``report.json``, ``report.md``
    and PNG plots into ``report_dir`` (each file written atomically)."""
    from tqdm import tqdm

    tokenizers = [load(d) for d in tokenizer_dirs]  # fail fast on a bad directory
    docs = load_documents(inputs, max_bytes)
    rows = [evaluate_tokenizer(t, docs, hidden_size=hidden_size, seq_length=seq_length)
            for t in tqdm(tokenizers, desc="evaluating tokenizers", disable=len(tokenizers) < 2)]
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, out)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    with atomic_file(out / "report.json", "w", encoding="utf-8") as handle:
        json.dump(public, handle, indent=2)
        handle.write("\n")
    atomic_write_text(out / "report.md", _markdown(rows, inputs, plots))
    return public
