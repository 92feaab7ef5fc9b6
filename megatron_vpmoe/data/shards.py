"""Megatron indexed-dataset shards (.bin/.idx): written natively, read with megatron-core.

Names follow Megatron-LM: ``{prefix}.{variant}_{key}_document`` for tokens and
``{prefix}.{variant}_{key}_lossmask_document`` (uint8 roles, aligned token for token) for
chat fields. The format is megatron-core's ``MMIDIDX`` (what its ``IndexedDatasetBuilder``
writes and its ``IndexedDataset``/``GPTDataset`` read; tests check the bytes are identical to
the builder's). Writing needs only numpy: importing megatron-core pulls in torch and costs
~5 s of CPU per run, a third of a 20 MB preprocessing job on 2 cores. Reading (:func:`read_shard`,
:func:`read_index`, merging existing shards) goes through megatron-core.
Files are written under ``.tmp`` names and renamed when complete (the old ``.idx`` removed,
then ``.bin``, then ``.idx``), so an interrupted run never leaves a pair that looks valid, and
:func:`verify` (used by every read here) checks the ``.bin`` size against the index. Worker processes write
pieces of a dataset (:meth:`ShardSet.finish_piece`, ``.tmp`` files only) that the parent
appends in input order (:meth:`ShardSet.append_piece`).
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from itertools import chain
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy

from megatron_vpmoe.data.chat import ROLE_TEXT
from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.megatron_import import import_megatron

TMP_SUFFIX = ".tmp"
INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's _INDEX_HEADER, then version 1 (<Q)
# megatron-core's DType codes (the byte after the version in every .idx)
DTYPE_CODES = {numpy.uint8: 1, numpy.int8: 2, numpy.int16: 3, numpy.int32: 4, numpy.int64: 5,
               numpy.float64: 6, numpy.float32: 7, numpy.uint16: 8}
_COPY_BLOCK = 1 << 22  # elements per block when writing constant masks


def _indexed_dataset_module():
    return import_megatron("megatron.core.datasets.indexed_dataset")


def token_prefix(prefix: str, variant: str, key: str, megatron_names=False) -> str:
    """``{prefix}.{variant}_{key}_document``; ``megatron_names`` (one variant): Megatron-LM's
    ``{prefix}_{key}_document``, or ``{prefix}_{key}_sentence`` when it is ``"sentence"`` (its
    ``--split-sentences`` output)."""
    if megatron_names:
        return f"{prefix}_{key}_{megatron_names if isinstance(megatron_names, str) else 'document'}"
    return f"{prefix}.{variant}_{key}_document"


def mask_prefix(prefix: str, variant: str, key: str, megatron_names=False) -> str:
    return mask_prefix_of(token_prefix(prefix, variant, key, megatron_names))


def mask_prefix_of(token_prefix_: str) -> str:
    """The loss-mask dataset that belongs to a token dataset prefix (may not exist)."""
    if token_prefix_.endswith("_document"):
        return token_prefix_[: -len("_document")] + "_lossmask_document"
    return token_prefix_ + "_lossmask"


def exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def token_dtype(vocab_size: int):
    """uint16 below 65,500 ids, else int32 (megatron-core's ``DType.optimal_dtype``)."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def write_index(path: str, dtype, sequence_lengths, document_indices) -> None:
    """An ``MMIDIDX`` index: header, version 1, dtype code, sequence and document counts, then
    int32 sequence lengths, int64 byte offsets of the sequences and int64 document indices."""
    lengths = numpy.asarray(sequence_lengths, dtype=numpy.int32)
    documents = numpy.asarray(document_indices, dtype=numpy.int64)
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    numpy.cumsum(lengths[:-1], dtype=numpy.int64, out=pointers[1:])
    pointers *= numpy.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[numpy.dtype(dtype).type]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(documents)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


class ShardWriter:
    """One indexed dataset written under temporary names; :meth:`commit` publishes it."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, numpy.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"{prefix}: dtype {self.dtype.__name__} has no indexed-dataset code")
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = prefix + ".bin" + TMP_SUFFIX
        self._tmp_idx = prefix + ".idx" + TMP_SUFFIX
        self._file = open(self._tmp_bin, "wb")
        self._lengths = array("q")  # one per sequence
        self._document_indices = array("q", [0])  # sequence index after each document
        self.documents = 0
        self.tokens = 0

    def add_many(self, documents: Sequence[Sequence[int]], sequence_lengths: Optional[Sequence] = None) -> None:
        """Documents in one write (a chunk of a piece: no per-document numpy array or write), of
        one sequence each unless ``sequence_lengths`` gives a document its sentences' lengths
        (None for one sequence); an empty one has no sequence (as megatron-core's
        ``IndexedDatasetBuilder.add_document([], [])`` writes Megatron-LM's empty documents)."""
        lengths = [len(ids) for ids in documents]
        total = sum(lengths)
        if total:
            flat = numpy.fromiter(chain.from_iterable(documents), dtype=self.dtype, count=total)
            self._file.write(memoryview(flat))
        sequences = len(self._lengths)
        for i, n in enumerate(lengths):
            parts = sequence_lengths[i] if sequence_lengths is not None else None
            if parts is not None:
                if sum(parts) != n:
                    raise ValueError(f"{self.prefix}: sentence lengths {list(parts)} do not add up to {n} tokens")
                self._lengths.extend(parts)
                sequences += len(parts)
            elif n:
                self._lengths.append(n)
                sequences += 1
            self._document_indices.append(sequences)
        self.documents += len(lengths)
        self.tokens += total

    def _extend_index(self, lengths: numpy.ndarray, document_indices: Optional[numpy.ndarray]) -> None:
        offset = len(self._lengths)
        self._lengths.frombytes(numpy.ascontiguousarray(lengths, dtype=numpy.int64).tobytes())
        if document_indices is None:  # one sequence per document
            ends = numpy.arange(offset + 1, offset + len(lengths) + 1, dtype=numpy.int64)
        else:
            ends = numpy.asarray(document_indices[1:], dtype=numpy.int64) + offset
        self._document_indices.frombytes(ends.tobytes())
        self.documents += len(ends)
        self.tokens += int(numpy.sum(lengths, dtype=numpy.int64))

    def append_data(self, bin_path: str, lengths, document_indices=None) -> None:
        """Append the raw token file ``bin_path`` holding sequences of ``lengths`` (one document
        each unless ``document_indices``, as in an ``.idx``, say otherwise)."""
        lengths = numpy.asarray(lengths, dtype=numpy.int64)
        expected = int(lengths.sum()) * numpy.dtype(self.dtype).itemsize
        size = os.path.getsize(bin_path)
        if size != expected:
            raise InputError(f"{bin_path}: {size} bytes, its index says {expected}")
        with open(bin_path, "rb") as src:
            shutil.copyfileobj(src, self._file, 1 << 20)
        self._extend_index(lengths, document_indices)

    def append_constant(self, value: int, lengths) -> None:
        """Append documents of ``lengths`` whose every element is ``value`` (a length-0 document
        has no sequence, as in :meth:`add_many`)."""
        lengths = numpy.asarray(lengths, dtype=numpy.int64)
        remaining = int(lengths.sum())
        block = numpy.full(min(remaining, _COPY_BLOCK), value, dtype=self.dtype).tobytes()
        while remaining > 0:
            n = min(remaining, _COPY_BLOCK)
            self._file.write(block[: n * numpy.dtype(self.dtype).itemsize])
            remaining -= n
        nonzero = lengths > 0
        self._extend_index(lengths[nonzero], numpy.concatenate(([0], numpy.cumsum(nonzero))))

    def merge(self, other_prefix: str) -> None:
        """Append an existing shard (its dtype must match)."""
        index = read_index(other_prefix)
        if index.dtype != self.dtype:
            raise InputError(f"{other_prefix}.idx: dtype {index.dtype.__name__} differs from "
                             f"{self.dtype.__name__} of the other shards")
        lengths, documents = numpy.array(index.sequence_lengths), numpy.array(index.document_indices)
        del index
        self.append_data(other_prefix + ".bin", lengths, documents)

    def finish_data(self) -> tuple:
        """Close the data file without publishing it: ``(temporary .bin path, lengths, document
        indices)``, for :meth:`append_data`."""
        self._file.close()
        return (self._tmp_bin, numpy.frombuffer(self._lengths, dtype=numpy.int64).copy(),
                numpy.frombuffer(self._document_indices, dtype=numpy.int64).copy())

    def commit(self) -> None:
        """Publish: the old ``.idx`` goes first, then the new ``.bin`` and ``.idx`` take their
        names, so no moment (and no kill) leaves a new ``.bin`` beside an old ``.idx``: a reader
        sees the old pair, no pair, or the new pair."""
        self._file.close()
        write_index(self._tmp_idx, self.dtype, self._lengths, self._document_indices)
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)


class ShardSet:
    """The token shards (and loss-mask shards) of one output prefix for every (variant, key).

    A loss-mask dataset is kept only for fields that held at least one chat document; plain
    documents in such a field get role 3 (text) for every token.
    """

    def __init__(self, prefix: str, variants: Dict[str, int], json_keys: Sequence[str],
                 megatron_names=False):
        self.prefix = prefix
        self.megatron_names = megatron_names
        self.tokens: Dict[tuple, ShardWriter] = {}
        # a mask shard is opened at the first chat document of its field; until then only the
        # plain documents' lengths are kept (their masks are constant) and written on opening
        self.masks: Dict[tuple, Optional[ShardWriter]] = {}
        self._plain_lengths: Dict[tuple, array] = {}
        try:
            for variant, vocab_size in variants.items():
                for key in json_keys:
                    k = (variant, key)
                    self.masks[k] = None
                    self._plain_lengths[k] = array("q")
                    self.tokens[k] = ShardWriter(token_prefix(prefix, variant, key, megatron_names),
                                                 token_dtype(vocab_size))
        except BaseException:
            self.abort()
            raise

    @property
    def has_chat(self) -> Dict[tuple, bool]:
        return {k: w is not None for k, w in self.masks.items()}

    def _open_mask(self, k: tuple) -> ShardWriter:
        if self.masks[k] is None:
            variant, key = k
            writer = ShardWriter(mask_prefix(self.prefix, variant, key, self.megatron_names), numpy.uint8)
            self.masks[k] = writer
            writer.append_constant(ROLE_TEXT, numpy.frombuffer(self._plain_lengths[k], dtype=numpy.int64))
            self._plain_lengths[k] = array("q")
        return self.masks[k]

    def add_many(self, docs: Sequence) -> None:
        """:class:`~megatron_vpmoe.data.encode.EncodedDocument` s (a chunk): one write per shard."""
        if not docs:
            return
        for k, writer in self.tokens.items():
            seqs = [doc.ids[k] for doc in docs]
            writer.add_many(seqs, [doc.sentences.get(k) for doc in docs])
            roles = [doc.roles[k] for doc in docs]
            if self.masks[k] is None and all(r is None for r in roles):
                self._plain_lengths[k].extend(len(ids) for ids in seqs)
                continue
            # plain documents in a field with chat ones: role 3 (text) for every token
            self._open_mask(k).add_many([r if r is not None else bytes((ROLE_TEXT,)) * len(ids)
                                         for r, ids in zip(roles, seqs)])

    def finish_piece(self) -> Dict[tuple, dict]:
        """Close a piece written by a worker without publishing it: per (variant, key), the
        temporary token file, its lengths, and the mask file (None without chat documents)."""
        out = {}
        for k, writer in self.tokens.items():
            bin_path, lengths, documents = writer.finish_data()
            mask = self.masks[k].finish_data()[0] if self.masks[k] is not None else None
            out[k] = {"bin": bin_path, "lengths": lengths, "documents": documents, "mask": mask}
        return out

    def append_piece(self, piece: Dict[tuple, dict]) -> None:
        """Append a worker's piece (:meth:`finish_piece`) and delete its files."""
        for k, part in piece.items():
            lengths, documents = part["lengths"], part["documents"]
            self.tokens[k].append_data(part["bin"], lengths, documents)
            if part["mask"] is not None:
                self._open_mask(k).append_data(part["mask"], lengths, documents)
            else:  # per document (an empty one has length 0 here and no sequence when written)
                per_doc = numpy.zeros(len(documents) - 1, dtype=numpy.int64)
                has_seq = numpy.diff(documents) > 0
                per_doc[has_seq] = lengths
                if self.masks[k] is not None:
                    self.masks[k].append_constant(ROLE_TEXT, per_doc)
                else:
                    self._plain_lengths[k].frombytes(per_doc.tobytes())
            for path in (part["bin"], part["mask"]):
                if path is not None:
                    os.remove(path)

    def commit(self, keep_masks: bool = False) -> List[str]:
        """Publish every shard; returns the prefixes written. ``keep_masks``: write the mask
        shards even for fields without chat documents (partitions merged with ones that have)."""
        written = []
        for k, writer in self.tokens.items():
            writer.commit()
            written.append(writer.prefix)
            if keep_masks:
                self._open_mask(k)
            if self.masks[k] is not None:
                self.masks[k].commit()
                written.append(self.masks[k].prefix)
        return written

    def abort(self) -> None:
        for writer in list(self.tokens.values()) + [w for w in self.masks.values() if w is not None]:
            writer.abort()

    def stats(self) -> Dict[tuple, dict]:
        return {k: {"documents": w.documents, "tokens": w.tokens, "loss_mask": self.has_chat[k]}
                for k, w in self.tokens.items()}


def read_shard(prefix: str):
    """megatron-core's ``IndexedDataset`` over a prefix, with a clear error when it is missing
    or its ``.bin`` does not have the size its ``.idx`` says (:func:`verify`)."""
    verify(prefix)
    return _indexed_dataset_module().IndexedDataset(prefix, multimodal=False, mmap=True)


def verify(prefix: str) -> None:
    """The ``.bin`` holds exactly the bytes the ``.idx`` indexes (a truncated ``.bin``, or one
    from another run beside this index, fails here in one line instead of reading garbage)."""
    if not exists(prefix):
        raise InputError(f"{prefix}: no indexed dataset here (.bin/.idx missing)")
    try:
        index = read_index(prefix)
    except (AssertionError, ValueError, struct.error, OSError) as err:
        raise InputError(f"{prefix}.idx: not a readable indexed-dataset index ({err or type(err).__name__})") \
            from None
    lengths, pointers = index.sequence_lengths, index.sequence_pointers
    expected = int(pointers[-1]) + int(lengths[-1]) * numpy.dtype(index.dtype).itemsize if len(lengths) else 0
    del index
    size = os.path.getsize(prefix + ".bin")
    if size != expected:
        raise InputError(f"{prefix}.bin: {size} bytes, but its .idx indexes {expected} "
                         f"({'truncated' if size < expected else 'not the data of this index'})")


def read_index(prefix: str):
    """The ``.idx`` of a dataset (dtype, sequence lengths, document indices)."""
    if not os.path.isfile(prefix + ".idx"):
        raise InputError(f"{prefix}.idx: not found")
    return _indexed_dataset_module()._IndexReader(prefix + ".idx", multimodal=False)


def remove_stale_temporaries(prefix: str) -> int:
    """Delete ``.tmp`` leftovers of an interrupted run under ``prefix``; returns how many."""
    parent = Path(prefix).parent
    stem = Path(prefix).name + "."
    removed = 0
    if parent.is_dir():
        for path in parent.iterdir():
            if path.name.startswith(stem) and path.name.endswith(TMP_SUFFIX):
                path.unlink()
                removed += 1
    return removed
