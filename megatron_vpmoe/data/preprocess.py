"""``vpmoe preprocess``: one pass over the inputs -> one shard set per tokenizer variant.

The inputs are cut into ordered pieces (:func:`sources.plan_pieces`: byte ranges of large
JSONL/text files aligned to record starts, small files grouped, compressed and parquet files
whole), several per worker for load balance. Each worker process reads, parses, encodes
(:mod:`encode`) and writes its piece to temporary shard files of its own (:mod:`shards`) and
returns only their lengths and its tally; the parent appends the pieces in input order, so
the output is the one a serial pass writes, and meanwhile shows progress from counters the
workers update. ``--workers 1`` runs the same code in this process (the tokenizer then uses its
own threads). Memory stays bounded: a worker holds one chunk of documents, the parent one
length per document. Bad records are skipped and counted by reason with their first
positions (``file:line``, absolute within the file); ``--strict`` makes the first one fatal.
With ``--partitions N`` the input files are split into N groups written as separate shard sets
and merged at the end; a re-run skips the partitions already written, so a long job resumes.
The final summary is printed and saved as ``{prefix}.summary.json`` (or ``summary_path``), last, with the fingerprint
(:mod:`fingerprint`) that makes a re-run "up to date"; it is removed before anything is
published. A run that would publish no documents is an error naming the input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from megatron_vpmoe.data import shards
from megatron_vpmoe.data.fingerprint import (
    fingerprint, published_sizes, read_summary, stale_reason, tokenizer_digests)
from megatron_vpmoe.data.encode import DocumentEncoder, EncodedDocument
from megatron_vpmoe.data.memory_plan import CHUNK_BYTES, DEFAULT_MAX_MEMORY_MB, plan
from megatron_vpmoe.data.sources import (
    DEFAULT_MAX_DOC_BYTES, Piece, Skipped, expand_inputs, iter_piece, plan_pieces, total_bytes)
from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import InputError

FIRST_POSITIONS = 5
PIECES_PER_WORKER = 8  # load balance: the last pieces finish close together
MIN_PIECE_BYTES = 256 << 10
MAX_PIECE_BYTES = 64 << 20  # bounds a piece's temporary files and the latency of --strict


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
    piece_bytes: int = 0  # input bytes per worker piece; 0: chosen from the input size and workers
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES  # a longer record is skipped as too_large
    keep_empty: bool = False  # Megatron-LM's rule: empty/whitespace-only documents are kept, not skipped
    # one variant, named as Megatron-LM names it: True {prefix}_{key}_document, "sentence" {prefix}_{key}_sentence
    megatron_names: Union[bool, str] = False
    split_sentences: Optional[str] = None  # a punkt language: each sentence a sequence (Megatron-LM's flag)
    summary_path: Optional[str] = None  # default {prefix}.summary.json
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB  # each worker's budget (memory_plan.py)


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
    """Batches of ``size`` records or :data:`CHUNK_BYTES` of input, whichever comes first."""
    chunk, nbytes = [], 0
    for item in items:
        chunk.append(item)
        nbytes += item.nbytes
        if len(chunk) >= size or nbytes >= CHUNK_BYTES:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


def write_piece(piece: Piece, shard_set: shards.ShardSet, encoder: DocumentEncoder, json_keys: Sequence[str],
                txt_blocks: bool, chunk_size: int, strict: bool, report: Callable[[int, int], None],
                max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, keep_empty: bool = False) -> dict:
    """Read, encode and append one piece's records to ``shard_set``; returns the piece's tally.
    ``report(documents, bytes)`` is called per chunk; the bytes reported add up to the piece's."""
    tally = Tally()
    left = piece.nbytes
    records = iter_piece(piece, json_keys, txt_blocks=txt_blocks, max_doc_bytes=max_doc_bytes,
                         keep_empty=keep_empty)
    for chunk in _chunks(records, chunk_size):
        nbytes = 0
        encoded = []
        for doc in encoder.encode_batch(chunk):
            nbytes += doc.nbytes
            if isinstance(doc, Skipped):
                if strict:
                    limit = f" (over --max-doc-bytes {max_doc_bytes})" if doc.reason == "too_large" else ""
                    raise InputError(f"{doc.where}: {doc.reason.replace('_', ' ')}{limit} (--strict)")
                tally.skip(doc)
                continue
            assert isinstance(doc, EncodedDocument)
            encoded.append(doc)
        shard_set.add_many(encoded)  # one write per shard and chunk
        tally.documents += len(encoded)
        nbytes = min(nbytes, left)  # compressed/parquet sizes are estimates
        left -= nbytes
        report(len(chunk), nbytes)
    report(0, left)
    tally.bytes = piece.nbytes
    return asdict(tally)


# ---- worker processes ----------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(encoder: DocumentEncoder, config: dict, counters) -> None:
    """Pool initializer (fork: the parent's encoder is inherited, not reloaded)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    _die_with_parent()
    # one process per worker already: the Rust tokenizers' own thread pool in every worker
    # would oversubscribe the cores (measured ~10% slower on 2 cores with 2 workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(encoder=encoder, counters=counters, **config)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the parent dies (even by SIGKILL), instead of writing
    piece files no one will collect."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _report_shared(docs: int, nbytes: int) -> None:
    counters = _WORKER["counters"]
    with counters.get_lock():
        counters[0] += docs
        counters[1] += nbytes


def _piece_in_worker(task) -> dict:
    """Write one piece to temporary shards named after it; return their files and the tally."""
    prefix, piece = task
    w = _WORKER
    shard_set = shards.ShardSet(f"{prefix}.piece{piece.index:06d}", w["vocab"], w["json_keys"])
    try:
        tally = write_piece(piece, shard_set, w["encoder"], w["json_keys"], w["txt_blocks"], w["chunk_size"],
                            w["strict"], _report_shared, w["max_doc_bytes"], w["keep_empty"])
        return {"tally": tally, "files": shard_set.finish_piece()}
    except BaseException:
        shard_set.abort()
        raise


class _Progress:
    def __init__(self, total_bytes: int, enabled: bool, log_interval: int):
        self.start = time.perf_counter()
        self.log_interval = log_interval
        self.bar = None
        self.docs = 0
        self.bytes = 0
        if enabled and sys.stderr.isatty():  # a bar on a terminal; plain periodic lines in logs and CI
            from megatron_vpmoe.utils.progress import terminal_bar

            self.bar = terminal_bar(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                    desc="preprocess")

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


class _Runner:
    """Runs pieces in worker processes (or in this process for one worker)."""

    def __init__(self, opts: PreprocessOptions, encoder: DocumentEncoder, vocab: Dict[str, int],
                 progress: _Progress):
        self.opts, self.encoder, self.vocab, self.progress = opts, encoder, vocab, progress
        self.pool = self.counters = None
        self._seen = (0, 0)

    def _pool(self):
        import multiprocessing as mp

        if self.pool is None:
            ctx = mp.get_context("spawn" if os.name != "posix" else "fork")
            self.counters = ctx.Array("q", 2)
            self._seen = (0, 0)
            config = {"vocab": self.vocab, "json_keys": list(self.opts.json_keys),
                      "txt_blocks": self.opts.txt_blocks, "chunk_size": self.opts.chunk_size,
                      "strict": self.opts.strict, "max_doc_bytes": self.opts.max_doc_bytes,
                      "keep_empty": self.opts.keep_empty}
            self.pool = ctx.Pool(self.opts.workers, initializer=_init_worker,
                                 initargs=(self.encoder, config, self.counters))
        return self.pool

    def _poll(self) -> None:
        with self.counters.get_lock():
            docs, nbytes = self.counters[0], self.counters[1]
        self.progress.update(docs - self._seen[0], nbytes - self._seen[1])
        self._seen = (docs, nbytes)

    def write(self, pieces: List[Piece], prefix: str, keep_masks: bool,
              before_commit: Callable[[Tally], None]) -> dict:
        """All pieces into the shard set ``prefix``, committed; returns the tally and shard stats.
        ``before_commit(tally)`` runs before anything is published (it may raise to publish nothing)."""
        opts = self.opts
        shard_set = shards.ShardSet(prefix, self.vocab, opts.json_keys, opts.megatron_names)
        tally = Tally()
        try:
            if opts.workers == 1:
                for piece in pieces:
                    tally.add(write_piece(piece, shard_set, self.encoder, opts.json_keys, opts.txt_blocks,
                                          opts.chunk_size, opts.strict, self.progress.update, opts.max_doc_bytes,
                                          opts.keep_empty))
            else:
                import multiprocessing as mp

                # in input order, one piece a task; pieces are small records, so queueing all is fine
                results = self._pool().imap(_piece_in_worker, [(prefix, p) for p in pieces])
                while True:
                    try:
                        result = results.next(timeout=0.25)
                    except mp.TimeoutError:
                        self._poll()
                        continue
                    except StopIteration:
                        break
                    shard_set.append_piece(result["files"])
                    tally.add(result["tally"])
                    self._poll()
            stats = shard_set.stats()
            before_commit(tally)
            shard_set.commit(keep_masks=keep_masks)
        except BaseException:
            self.close()  # no worker writes any more
            shard_set.abort()
            shards.remove_stale_temporaries(prefix)  # the pieces' files
            raise
        out = asdict(tally)
        out["shards"] = {f"{v}/{k}": s for (v, k), s in stats.items()}
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _piece_bytes(opts: PreprocessOptions, size: int) -> int:
    if opts.piece_bytes:
        return opts.piece_bytes
    return max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, size // (opts.workers * PIECES_PER_WORKER) + 1))


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
    if opts.megatron_names and len(opts.tokenizers) > 1:
        raise InputError("Megatron-LM's output names ({prefix}_{key}_document) hold one tokenizer: give one")
    encoder = DocumentEncoder(opts.tokenizers, opts.json_keys, opts.append_eod, opts.keep_empty,
                              opts.split_sentences)
    vocab = {name: tok.vocab_size for name, tok in encoder.tokenizers.items()}
    prefix = opts.output_prefix
    if opts.max_doc_bytes < 1:
        raise InputError("--max-doc-bytes must be >= 1")
    doc_limit, note = plan(opts.max_memory_mb, opts.max_doc_bytes, encoder.engines)
    if note:
        print(f"preprocess: {note}", flush=True)
    opts = dataclasses.replace(opts, max_doc_bytes=doc_limit)
    flags = {"json_keys": list(opts.json_keys), "append_eod": opts.append_eod, "txt_blocks": opts.txt_blocks,
             "max_doc_bytes": opts.max_doc_bytes, "keep_empty": opts.keep_empty,
             "split_sentences": opts.split_sentences}
    toks = tokenizer_digests(opts.tokenizers)
    current = fingerprint(files, toks, flags)
    names = opts.megatron_names
    finals = [shards.token_prefix(prefix, v, k, names) for v in vocab for k in opts.json_keys]
    summary_path = Path(opts.summary_path or prefix + ".summary.json")
    old = read_summary(summary_path)
    reason = stale_reason(old, current, os.path.dirname(prefix) or ".", _names(finals))
    if reason is None and not opts.overwrite:
        old["up_to_date"] = True
        return old
    if old is not None and reason is not None:
        print(f"{prefix}: {reason}; rebuilding", flush=True)
    shards.remove_stale_temporaries(prefix)

    def publishing(tally: Tally) -> None:
        """Before the final shards replace anything: refuse an empty result; drop the old
        summary, so a run killed while publishing is never taken for a finished one."""
        if tally.documents == 0:
            raise _nothing_to_write(files, tally)
        summary_path.unlink(missing_ok=True)

    groups = _split_files(files, opts.partitions) if opts.partitions > 1 else [files]
    groups = [g for g in groups if g]
    start = time.perf_counter()
    progress = _Progress(total_bytes(files), opts.progress, opts.log_interval)
    runner = _Runner(opts, encoder, vocab, progress)
    tally = Tally()
    part_stats: List[dict] = []
    try:
        if len(groups) <= 1:
            pieces = plan_pieces(files, _piece_bytes(opts, total_bytes(files)), txt_blocks=opts.txt_blocks)
            part_stats.append(runner.write(pieces, prefix, False, publishing))
        else:
            for i, group in enumerate(groups):
                part = f"{prefix}_part{i:03d}of{len(groups):03d}"
                part_summary = Path(part + ".summary.json")
                done = [shards.token_prefix(part, v, k, names) for v in vocab for k in opts.json_keys]
                part_print = fingerprint(group, toks, flags)
                stats = read_summary(part_summary)
                if stale_reason(stats, part_print, os.path.dirname(part) or ".", _names(done)) is None \
                        and not opts.overwrite:
                    print(f"{part}: already written ({stats['documents']} documents), skipped", flush=True)
                    progress.update(stats["documents"], sum(f.stat().st_size for f in group))
                else:
                    part_summary.unlink(missing_ok=True)
                    shards.remove_stale_temporaries(part)
                    pieces = plan_pieces(group, _piece_bytes(opts, total_bytes(group)), txt_blocks=opts.txt_blocks)
                    stats = runner.write(pieces, part, True, lambda tally: None)
                    stats["fingerprint"] = part_print
                    stats["files"] = published_sizes(_with_masks(done))
                    atomic_write_text(part_summary, json.dumps(stats))
                part_stats.append(stats)
            parts = [f"{prefix}_part{i:03d}of{len(groups):03d}" for i in range(len(groups))]
            total = Tally()
            for stats in part_stats:
                total.add(stats)
            if total.documents == 0:
                _remove_parts(parts, vocab, opts.json_keys, names)
            publishing(total)
            _merge_partitions(prefix, parts, part_stats, vocab, opts.json_keys, names)
    finally:
        progress.close()
        runner.close()
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
        "workers": opts.workers, "partitions": len(groups), "engines": encoder.engines,
        "max_memory_mb": opts.max_memory_mb, "max_doc_bytes": opts.max_doc_bytes,
        "fingerprint": current, "files": published_sizes(_with_masks(finals)),
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary


def _names(prefixes: Sequence[str]) -> List[str]:
    """The ``.bin``/``.idx`` file names of dataset prefixes."""
    return [os.path.basename(p) + ext for p in prefixes for ext in (".bin", ".idx")]


def _with_masks(prefixes: Sequence[str]) -> List[str]:
    return [q for p in prefixes for q in (p, shards.mask_prefix_of(p))]


def _nothing_to_write(files: Sequence[Path], tally: Tally) -> InputError:
    where = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more inputs)"
    skipped = sum(tally.skipped.values())
    if not skipped:
        return InputError(f"{where}: no documents in the input; nothing was published")
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(tally.skipped.items()))
    first = next(iter(tally.first_skipped.values()))[0]
    return InputError(f"{where}: all {skipped} records were skipped ({reasons}; first at {first}); "
                      f"nothing was published")


def _merge_partitions(prefix: str, parts: List[str], part_stats: List[dict], vocab: Dict[str, int],
                      json_keys: Sequence[str], megatron_names=False) -> None:
    for variant, vocab_size in vocab.items():
        for key in json_keys:
            name = f"{variant}/{key}"
            chat = any(s["shards"][name]["loss_mask"] for s in part_stats)
            outputs = [(shards.token_prefix, shards.token_dtype(vocab_size))]
            if chat:
                import numpy

                outputs.append((shards.mask_prefix, numpy.uint8))
            for naming, dtype in outputs:
                writer = shards.ShardWriter(naming(prefix, variant, key, megatron_names), dtype)
                try:
                    for part in parts:
                        writer.merge(naming(part, variant, key, megatron_names))
                    writer.commit()
                except BaseException:
                    writer.abort()
                    raise
    _remove_parts(parts, vocab, json_keys, megatron_names)  # the merged set is complete


def _remove_parts(parts: List[str], vocab: Dict[str, int], json_keys: Sequence[str],
                  megatron_names=False) -> None:
    for part in parts:
        for variant in vocab:
            for key in json_keys:
                for naming in (shards.token_prefix, shards.mask_prefix):
                    for ext in (".bin", ".idx"):
                        path = naming(part, variant, key, megatron_names) + ext
                        if os.path.exists(path):
                            os.remove(path)
        if os.path.exists(part + ".summary.json"):
            os.remove(part + ".summary.json")


def merge_shards(inputs: Sequence[str], output: str) -> dict:
    """Concatenate token datasets (and their loss masks when every input has one) into ``output``."""
    if not inputs:
        raise InputError("merge: give at least one input prefix")
    for p in inputs:  # an .idx that is no index, or a .bin it does not describe: one line
        shards.verify(p)
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
