"""Training datasets: megatron-core's blended GPT datasets over the shards, with loss roles.

:func:`build_datasets` hands ``data.blend`` / ``data.split`` / ``data.seq_length`` to
megatron-core's ``BlendedMegatronDatasetBuilder`` (its document/sample/shuffle indices, blend
weights, cache and seed handling, unchanged). :class:`RoleMaskedGPTDataset` adds the loss roles:
when a prefix has a sibling ``..._lossmask_document`` dataset, the same sample index is read
from it (one shallow view of the dataset over the mask shard), so roles align with tokens by
construction. Items: ``tokens``, ``labels`` (int64, next tokens), ``loss_mask`` (uint8 role per
label position: 0 none, 1 reasoning, 2 final, 3 plain text), ``position_ids``.

The index cache lives in ``cache_dir``. Call it on every rank at once: when torch.distributed is
initialised, megatron-core's builder builds the cache on rank 0 first and the other ranks then
read it (it synchronises with barriers).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Optional, Sequence, Tuple

import numpy
import torch

from megatron_vpmoe.data.chat import ROLE_TEXT
from megatron_vpmoe.data.shards import exists, mask_prefix_of, verify
from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.megatron_import import import_megatron



class _TokenizerInfo:
    """What megatron-core's GPT datasets read from a tokenizer: eod, pad, vocab size."""

    def __init__(self, eod: int, pad: int, vocab_size: Optional[int]):
        self.eod, self.pad, self.vocab_size = eod, pad, vocab_size
        self.unique_identifiers = {"class": "vpmoe", "eod": eod, "pad": pad}


def _dataset_classes(index_cache_dir: Optional[str]):
    """The dataset classes; ``index_cache_dir`` is where a GPT dataset's index cache goes when
    the config has no cache path (one process)."""
    gpt = import_megatron("megatron.core.datasets.gpt_dataset")
    GPTDataset, MockGPTDataset = gpt.GPTDataset, gpt.MockGPTDataset

    class RoleMaskedGPTDataset(GPTDataset):
        """``GPTDataset`` whose ``loss_mask`` carries roles from a parallel mask dataset."""

        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            if config.path_to_cache is None and index_cache_dir:
                # without it megatron-core writes <shard prefix>/cache next to the shards
                config = copy.copy(config)
                config.path_to_cache = index_cache_dir
            super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
            self._mask_view = None
            mask = mask_prefix_of(dataset_path) if dataset_path else None
            if mask and exists(mask):
                mask_ds = GPTDataset.build_low_level_dataset(mask, config)
                if not numpy.array_equal(mask_ds.sequence_lengths, indexed_dataset.sequence_lengths):
                    raise InputError(f"{mask}: loss-mask dataset does not align with {dataset_path} "
                                     f"(different sequence lengths)")
                self._mask_view = copy.copy(self)
                self._mask_view.dataset = mask_ds

        def __getitem__(self, idx):
            item = super().__getitem__(idx)
            keep = item["loss_mask"] > 0  # megatron's own masking: padding, (EOD when configured)
            if self._mask_view is None:
                roles = torch.where(keep, ROLE_TEXT, 0).to(torch.uint8)
            else:
                raw, _ = self._mask_view._query_document_sample_shuffle_indices(0 if idx is None else idx)
                label_roles = torch.from_numpy(raw[1:].astype(numpy.int64))  # roles of the targets
                roles = torch.where(keep, label_roles, 0).to(torch.uint8)
            item["loss_mask"] = roles
            item.pop("attention_mask", None)
            return item

    class RoleMaskedMockGPTDataset(MockGPTDataset):
        def __getitem__(self, idx):
            item = super().__getitem__(idx)
            item["loss_mask"] = torch.where(item["loss_mask"] > 0, ROLE_TEXT, 0).to(torch.uint8)
            item.pop("attention_mask", None)
            return item

    return RoleMaskedGPTDataset, RoleMaskedMockGPTDataset


def checked_blend(data_cfg) -> Tuple[list, list]:
    """``(prefixes, weights)`` of ``data.blend``, each prefix's shards (and loss mask) found and intact."""
    prefixes, weights = [], []
    for i, (weight, prefix) in enumerate(data_cfg.blend):
        if not exists(prefix):
            raise InputError(f"data.blend[{i}]: {prefix}.bin/.idx not found (run 'vpmoe preprocess' first)")
        for shard in (prefix, mask_prefix_of(prefix)):
            if shard == prefix or exists(shard):
                try:  # a truncated or mismatched .bin fails here, not as garbage samples
                    verify(shard)
                except InputError as err:
                    raise InputError(f"data.blend[{i}]: {err}") from None
        prefixes.append(prefix)
        weights.append(float(weight))
    return prefixes, weights


def _check_splits(prefixes, split_matrix, num_samples) -> None:
    """Every split that is asked for samples must get at least one sequence of every prefix
    (megatron-core's epoch count loops forever on an empty split); same rounding as its builder."""
    from megatron_vpmoe.data.shards import read_index

    names = ("train", "valid", "test")
    for prefix in prefixes:
        n = len(read_index(prefix).sequence_lengths)
        for i, bounds in enumerate(split_matrix):
            if bounds is None or not num_samples[i]:
                continue
            if int(round(bounds[1] * n)) - int(round(bounds[0] * n)) <= 0:
                raise InputError(f"{prefix}: its {n} sequences leave the {names[i]} split empty with "
                                 f"data.split; use a larger dataset or change data.split")


def build_datasets(data_cfg, *, seed: int, num_samples: Sequence[int], eod_id: int, pad_id: int,
                   cache_dir: str, vocab_size: Optional[int] = None):
    """(train, valid, test) datasets for ``data_cfg`` (a :class:`DataConfig`); an empty split is None.

    ``num_samples``: samples to draw per split (an int means training samples only).
    """
    if isinstance(num_samples, int):
        num_samples = (num_samples, 0, 0)
    BlendedMegatronDatasetBuilder = import_megatron(
        "megatron.core.datasets.blended_megatron_dataset_builder").BlendedMegatronDatasetBuilder
    GPTDatasetConfig = import_megatron("megatron.core.datasets.gpt_dataset").GPTDatasetConfig

    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    os.makedirs(cache_dir, exist_ok=True)
    if pad_id == eod_id:  # no distinct pad token: megatron-core would reset it to -1 with a warning
        pad_id = -1
    masked_cls, mock_cls = _dataset_classes(cache_dir)
    blend = None if data_cfg.mock else checked_blend(data_cfg)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data_cfg.seq_length,
        blend=blend,
        split=data_cfg.split,
        # megatron-core's blended index cache needs torch.distributed; one process builds it in
        # memory (the GPT index cache still goes to cache_dir, see RoleMaskedGPTDataset)
        path_to_cache=cache_dir if torch.distributed.is_initialized() else None,
        tokenizer=_TokenizerInfo(eod_id, pad_id, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if blend is not None:
        _check_splits(blend[0], config.split_matrix, num_samples)
    builder = BlendedMegatronDatasetBuilder(mock_cls if data_cfg.mock else masked_cls,
                                            [int(n) for n in num_samples], lambda: True, config)
    train, valid, test = builder.build()
    return train, valid, test
