"""``vpmoe preprocess``: one pass over the inputs -> one shard set per tokenizer variant.

Records stream from :mod:`sources` in chunks to worker processes (:mod:`encode`), come back in
input order and are appended to the shards (:mod:`shards`). At most ``2 x workers`` chunks are
in flight, so memory stays bounded whatever the input size. Bad records are skipped and
counted by reason with their first positions (``--strict`` makes the first one fatal). With
``--partitions N`` the input files are split into N groups written as separate shard sets and
merged at the end; a re-run skips the partitions already written, so a long job resumes.
The final summary is printed and saved as ``{prefix}.summary.json``.
"""

from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from megatron_vpmoe.data import shards
from megatron_vpmoe.data.encode import DocumentEncoder, EncodedDocument, encode_in_worker, init_worker
from megatron_vpmoe.data.sources import Skipped, expand_inputs, iter_documents, total_bytes
from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import InputError

FIRST_POSITIONS = 5


@dataclass
class PreprocessOptions:
    inputs: List[str]
    output_prefix: str
    tokenizers: Dict[str, str]  # variant name -> tokenizer directory
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = True
    workers: int = 1
    chunk_size: int = 64
    partitions: int = 1
    txt_blocks: bool = False
    strict: bool = False
    log_interval: int = 0  # documents between log lines when there is no progress bar
    progress: bool = True
    overwrite: bool = False


@dataclass
class Tally:
    documents: int = 0
    bytes: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    first_skipped: Dict[str, List[str]] = field(default_factory=dict)

    def skip(self, item: Skipped) -> None:
        self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
        firsts = self.first_skipped.setdefault(item.reason, [])
        if len(firsts) < FIRST_POSITIONS:
            firsts.append(item.where)

    def add(self, other: dict) -> None:
        self.documents += other["documents"]
        self.bytes += other["bytes"]
        for reason, n in other["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            firsts = self.first_skipped.setdefault(reason, [])
            firsts.extend(other["first_skipped"][reason][: FIRST_POSITIONS - len(firsts)])


def parse_tokenizer_args(values: Sequence[str]) -> Dict[str, str]:
    """``DIR`` or ``NAME=DIR``; the variant name defaults to the directory's name."""
    out: Dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise InputError(f"--tokenizer {value!r}: expected DIR or NAME=DIR")
        if name in out:
            raise InputError(f"--tokenizer: variant name {name!r} given twice (use NAME=DIR)")
        out[name] = path
    return out


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_bounded(pool, chunks: Iterator[list], in_flight: int) -> Iterator[list]:
    """``pool.imap`` in order, but reading ahead at most ``in_flight`` chunks (imap would read
    the whole input into its task queue)."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(encode_in_worker, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Progress:
    def __init__(self, total_bytes: int, enabled: bool, log_interval: int):
        self.start = time.perf_counter()
        self.log_interval = log_interval
        self.bar = None
        self.docs = 0
        self.bytes = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="preprocess", dynamic_ncols=True)

    def update(self, docs: int, nbytes: int) -> None:
        before = self.docs
        self.docs += docs
        self.bytes += nbytes
        rate = self.docs / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix(docs=self.docs, docs_s=f"{rate:.0f}", refresh=False)
        elif self.log_interval and self.docs // self.log_interval > before // self.log_interval:
            mb_s = self.bytes / 1e6 / max(time.perf_counter() - self.start, 1e-9)
            print(f"preprocess: {self.docs} documents, {rate:.0f} docs/s, {mb_s:.2f} MB/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_partition(files: List[Path], prefix: str, opts: PreprocessOptions, vocab: Dict[str, int],
                     pool, encoder: Optional[DocumentEncoder], progress: _Progress, keep_masks: bool) -> dict:
    shard_set = shards.ShardSet(prefix, vocab, opts.json_keys)
    tally = Tally()
    try:
        chunks = _chunks(iter_documents(files, opts.json_keys, txt_blocks=opts.txt_blocks), opts.chunk_size)
        results = (_ordered_bounded(pool, chunks, 2 * opts.workers) if pool is not None
                   else (encoder.encode_batch(c) for c in chunks))
        for encoded in results:
            nbytes = 0
            for doc in encoded:
                nbytes += doc.nbytes
                if isinstance(doc, Skipped):
                    if opts.strict:
                        raise InputError(f"{doc.where}: {doc.reason.replace('_', ' ')} (--strict)")
                    tally.skip(doc)
                    continue
                assert isinstance(doc, EncodedDocument)
                shard_set.add(doc)
                tally.documents += 1
            tally.bytes += nbytes
            progress.update(len(encoded), nbytes)
        stats = shard_set.stats()
        shard_set.commit(keep_masks=keep_masks)
    except BaseException:
        shard_set.abort()
        raise
    out = asdict(tally)
    out["shards"] = {f"{v}/{k}": s for (v, k), s in stats.items()}
    return out


def _split_files(files: List[Path], partitions: int) -> List[List[Path]]:
    """Round-robin by size, largest first, so partitions are balanced and deterministic."""
    groups: List[List[Path]] = [[] for _ in range(partitions)]
    sizes = [0] * partitions
    for f in sorted(files, key=lambda p: (-p.stat().st_size, str(p))):
        i = sizes.index(min(sizes))
        groups[i].append(f)
        sizes[i] += f.stat().st_size
    return [sorted(g) for g in groups]


def run_preprocess(opts: PreprocessOptions) -> dict:
    """Run (or resume) preprocessing; returns the summary (also written to ``{prefix}.summary.json``)."""
    if not opts.tokenizers:
        raise InputError("give at least one --tokenizer DIR")
    if opts.workers < 1 or opts.partitions < 1 or opts.chunk_size < 1:
        raise InputError("--workers, --partitions and --chunk-size must be >= 1")
    files = expand_inputs(opts.inputs)
    from megatron_vpmoe.tokenizers import load_tokenizer

    vocab = {name: load_tokenizer(path).vocab_size for name, path in opts.tokenizers.items()}
    prefix = opts.output_prefix
    finals = [shards.token_prefix(prefix, v, k) for v in vocab for k in opts.json_keys]
    summary_path = Path(prefix + ".summary.json")
    if all(shards.exists(p) for p in finals) and summary_path.is_file() and not opts.overwrite:
        summary = json.loads(summary_path.read_text())
        summary["up_to_date"] = True
        return summary
    shards.remove_stale_temporaries(prefix)

    groups = _split_files(files, opts.partitions) if opts.partitions > 1 else [files]
    groups = [g for g in groups if g]
    start = time.perf_counter()
    progress = _Progress(total_bytes(files), opts.progress, opts.log_interval)
    pool = encoder = None
    if opts.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if os.name != "posix" else "fork").Pool(
            opts.workers, initializer=init_worker, initargs=(opts.tokenizers, opts.json_keys, opts.append_eod))
    else:
        encoder = DocumentEncoder(opts.tokenizers, opts.json_keys, opts.append_eod)
    tally = Tally()
    part_stats: List[dict] = []
    try:
        if len(groups) == 1:
            part_stats.append(_write_partition(groups[0], prefix, opts, vocab, pool, encoder, progress, False))
        else:
            for i, group in enumerate(groups):
                part = f"{prefix}_part{i:03d}of{len(groups):03d}"
                part_summary = Path(part + ".summary.json")
                done = [shards.token_prefix(part, v, k) for v in vocab for k in opts.json_keys]
                if part_summary.is_file() and all(shards.exists(p) for p in done) and not opts.overwrite:
                    stats = json.loads(part_summary.read_text())
                    print(f"{part}: already written ({stats['documents']} documents), skipped", flush=True)
                    progress.update(stats["documents"], sum(f.stat().st_size for f in group))
                else:
                    shards.remove_stale_temporaries(part)
                    stats = _write_partition(group, part, opts, vocab, pool, encoder, progress, True)
                    atomic_write_text(part_summary, json.dumps(stats))
                part_stats.append(stats)
            _merge_partitions(prefix, [f"{prefix}_part{i:03d}of{len(groups):03d}" for i in range(len(groups))],
                              part_stats, vocab, opts.json_keys)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    for stats in part_stats:
        tally.add(stats)
    seconds = time.perf_counter() - start
    per_field = {}
    for stats in part_stats:
        for name, s in stats["shards"].items():
            agg = per_field.setdefault(name, {"documents": 0, "tokens": 0, "loss_mask": False})
            agg["documents"] += s["documents"]
            agg["tokens"] += s["tokens"]
            agg["loss_mask"] = agg["loss_mask"] or s["loss_mask"]
    tokens_per_variant = {v: sum(s["tokens"] for n, s in per_field.items() if n.split("/")[0] == v) for v in vocab}
    summary = {
        "inputs": [str(f) for f in files], "output_prefix": prefix, "tokenizers": opts.tokenizers,
        "json_keys": opts.json_keys, "documents": tally.documents, "bytes": tally.bytes,
        "skipped": tally.skipped, "first_skipped": tally.first_skipped,
        "tokens_per_variant": tokens_per_variant, "shards": per_field,
        "seconds": round(seconds, 3), "docs_per_s": round(tally.documents / max(seconds, 1e-9), 1),
        "mb_per_s": round(tally.bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_s": round(sum(tokens_per_variant.values()) / max(seconds, 1e-9), 1),
        "workers": opts.workers, "partitions": len(groups),
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary


def _merge_partitions(prefix: str, parts: List[str], part_stats: List[dict], vocab: Dict[str, int],
                      json_keys: Sequence[str]) -> None:
    for variant, vocab_size in vocab.items():
        for key in json_keys:
            name = f"{variant}/{key}"
            chat = any(s["shards"][name]["loss_mask"] for s in part_stats)
            outputs = [(shards.token_prefix, shards.token_dtype(vocab_size))]
            if chat:
                import numpy

                outputs.append((shards.mask_prefix, numpy.uint8))
            for naming, dtype in outputs:
                writer = shards.ShardWriter(naming(prefix, variant, key), dtype)
                try:
                    for part in parts:
                        writer.merge(naming(part, variant, key))
                    writer.commit()
                except BaseException:
                    writer.abort()
                    raise
    for part in parts:  # the merged set is complete: drop the parts
        for variant in vocab:
            for key in json_keys:
                for naming in (shards.token_prefix, shards.mask_prefix):
                    for ext in (".bin", ".idx"):
                        path = naming(part, variant, key) + ext
                        if os.path.exists(path):
                            os.remove(path)
        if os.path.exists(part + ".summary.json"):
            os.remove(part + ".summary.json")


def merge_shards(inputs: Sequence[str], output: str) -> dict:
    """Concatenate token datasets (and their loss masks when every input has one) into ``output``."""
    if not inputs:
        raise InputError("merge: give at least one input prefix")
    for p in inputs:
        if not shards.exists(p):
            raise InputError(f"{p}: no indexed dataset here (.bin/.idx missing)")
    dtype = shards.read_index(inputs[0]).dtype
    masks = [shards.mask_prefix_of(p) for p in inputs]
    with_masks = all(shards.exists(m) for m in masks)
    if not with_masks and any(shards.exists(m) for m in masks):
        raise InputError("merge: some inputs have loss-mask datasets and some do not; merging would "
                         "misalign them")
    result = {}
    import numpy

    jobs = [(inputs, output, dtype)] + ([(masks, shards.mask_prefix_of(output), numpy.uint8)] if with_masks else [])
    for sources, target, dt in jobs:
        writer = shards.ShardWriter(target, dt)
        try:
            for p in sources:
                writer.merge(p)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        result[target] = {"documents": writer.documents, "tokens": writer.tokens}
    return result
