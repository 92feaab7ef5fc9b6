"""Megatron indexed-dataset shards (.bin/.idx), written atomically with megatron-core's builder.

Names follow Megatron-LM: ``{prefix}.{variant}_{key}_document`` for tokens and
``{prefix}.{variant}_{key}_lossmask_document`` (uint8 roles, aligned token for token) for
chat fields. The format is megatron-core's own (:class:`IndexedDatasetBuilder`), so its
``IndexedDataset``/``GPTDataset`` read these and this stack reads existing Megatron shards.
Files are written under ``.tmp`` names and renamed when complete (``.bin`` first, ``.idx``
last), so an interrupted run never leaves a pair that looks valid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy

from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.megatron_import import import_megatron

TMP_SUFFIX = ".tmp"


def _indexed_dataset_module():
    return import_megatron("megatron.core.datasets.indexed_dataset")


def token_prefix(prefix: str, variant: str, key: str) -> str:
    return f"{prefix}.{variant}_{key}_document"


def mask_prefix(prefix: str, variant: str, key: str) -> str:
    return f"{prefix}.{variant}_{key}_lossmask_document"


def mask_prefix_of(token_prefix_: str) -> str:
    """The loss-mask dataset that belongs to a token dataset prefix (may not exist)."""
    if token_prefix_.endswith("_document"):
        return token_prefix_[: -len("_document")] + "_lossmask_document"
    return token_prefix_ + "_lossmask"


def exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def token_dtype(vocab_size: int):
    """uint16 below 65,500 ids, else int32 (megatron-core's ``DType.optimal_dtype``)."""
    return _indexed_dataset_module().DType.optimal_dtype(vocab_size)


class ShardWriter:
    """One indexed dataset written under temporary names; :meth:`commit` publishes it."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, dtype
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = prefix + ".bin" + TMP_SUFFIX
        self._tmp_idx = prefix + ".idx" + TMP_SUFFIX
        self.builder = _indexed_dataset_module().IndexedDatasetBuilder(self._tmp_bin, dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add(self, ids: Sequence[int]) -> None:
        self.builder.add_document(numpy.asarray(ids, dtype=self.dtype), [len(ids)])
        self.documents += 1
        self.tokens += len(ids)

    def merge(self, other_prefix: str) -> None:
        """Append an existing shard (its dtype must match)."""
        index = read_index(other_prefix)
        if index.dtype != self.dtype:
            raise InputError(f"{other_prefix}.idx: dtype {index.dtype.__name__} differs from "
                             f"{self.dtype.__name__} of the other shards")
        self.documents += len(index.document_indices) - 1
        self.tokens += int(index.sequence_lengths.sum())
        del index
        self.builder.add_index(other_prefix)

    def commit(self) -> None:
        self.builder.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
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

    def __init__(self, prefix: str, variants: Dict[str, int], json_keys: Sequence[str]):
        self.prefix = prefix
        self.tokens: Dict[tuple, ShardWriter] = {}
        # a mask shard is opened at the first chat document of its field; until then only the
        # plain documents' lengths are kept (their masks are constant) and written on opening
        self.masks: Dict[tuple, Optional[ShardWriter]] = {}
        self._plain_lengths: Dict[tuple, List[int]] = {}
        for variant, vocab_size in variants.items():
            for key in json_keys:
                k = (variant, key)
                self.tokens[k] = ShardWriter(token_prefix(prefix, variant, key), token_dtype(vocab_size))
                self.masks[k] = None
                self._plain_lengths[k] = []

    @property
    def has_chat(self) -> Dict[tuple, bool]:
        return {k: w is not None for k, w in self.masks.items()}

    @staticmethod
    def _text_roles(n: int) -> numpy.ndarray:
        """The mask of a plain document of ``n`` tokens: role 3 (text) everywhere."""
        from megatron_vpmoe.data.encode import ROLE_TEXT

        return numpy.full(n, ROLE_TEXT, dtype=numpy.uint8)

    def _open_mask(self, k: tuple) -> ShardWriter:
        if self.masks[k] is None:
            variant, key = k
            writer = ShardWriter(mask_prefix(self.prefix, variant, key), numpy.uint8)
            for n in self._plain_lengths[k]:
                writer.add(self._text_roles(n))
            self._plain_lengths[k] = []
            self.masks[k] = writer
        return self.masks[k]

    def add(self, doc) -> None:
        """An :class:`~megatron_vpmoe.data.encode.EncodedDocument`."""
        for k, ids in doc.ids.items():
            self.tokens[k].add(ids)
            roles = doc.roles[k]
            if roles is not None:
                self._open_mask(k).add(roles)
            elif self.masks[k] is not None:
                self.masks[k].add(self._text_roles(len(ids)))
            else:
                self._plain_lengths[k].append(len(ids))

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
    """megatron-core's ``IndexedDataset`` over a prefix, with a clear error when it is missing."""
    if not exists(prefix):
        raise InputError(f"{prefix}: no indexed dataset here (.bin/.idx missing)")
    return _indexed_dataset_module().IndexedDataset(prefix, multimodal=False, mmap=True)


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
