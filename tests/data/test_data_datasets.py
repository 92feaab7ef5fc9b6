"""build_datasets: megatron-core's blended GPT datasets over our shards, roles aligned with the
token sample index, blend weights honoured, deterministic per seed, index cache built once
across ranks."""

from __future__ import annotations

import collections
import itertools
import json

import numpy
import pytest
import torch

from megatron_vpmoe.config.schema import DataConfig
from megatron_vpmoe.data.dataset import build_datasets
from megatron_vpmoe.data.preprocess import PreprocessOptions, run_preprocess
from megatron_vpmoe.data.shards import read_shard
from megatron_vpmoe.tokenizers import load, train_tokenizer
from megatron_vpmoe.utils.errors import InputError
from helpers.distributed import run_distributed


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data, o200k):  # its chat records render Harmony: o200k ranks
    out = tmp_path_factory.mktemp("shards")
    tok = train_tokenizer("bpe", [str(shared_data / "corpora" / "tinyshakespeare.txt")], 600, max_bytes=150_000)
    tok_dir = str(tok.save(out / "tok"))
    chat = out / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(60):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "thinking": f"Double {i}.", "content": f"It is {2 * i}."}]}) + "\n")
    run_preprocess(PreprocessOptions([str(chat)], str(out / "kd"), {"tok": tok_dir}, json_keys=["messages"],
                                     progress=False))
    run_preprocess(PreprocessOptions([str(shared_data / "corpora" / "tinyshakespeare.txt")], str(out / "text"),
                                     {"tok": tok_dir}, txt_blocks=True, progress=False))
    tok = load(tok_dir)
    return {"kd": str(out / "kd.tok_messages_document"), "text": str(out / "text.tok_text_document"),
            "tok": tok, "dir": out}


def _build(shards, blend, seed=1, n=(300, 10, 10), split="90,5,5", tmp=None):
    cfg = DataConfig(blend=blend, seq_length=48, split=split)
    return build_datasets(cfg, seed=seed, num_samples=n, eod_id=shards["tok"].eod_id, pad_id=shards["tok"].pad_id,
                          cache_dir=str(tmp or shards["dir"] / "cache"), vocab_size=shards["tok"].vocab_size)


def test_items_and_roles_align_with_tokens(shards):
    train, valid, test = _build(shards, [[1.0, shards["kd"]]])
    assert valid is not None and test is not None
    tok = shards["tok"]
    spans = {1: [f"Double {i}.<|end|>" for i in range(60)], 2: [f"It is {2 * i}.<|return|>" for i in range(60)]}
    seen = collections.Counter()
    for i in range(50):
        item = train[i]
        assert set(item) >= {"tokens", "labels", "loss_mask", "position_ids"}
        assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.uint8
        assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (48,)
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels are the next tokens
        roles = item["loss_mask"].tolist()
        seen.update(roles)
        labels = item["labels"].tolist()
        # every supervised run of labels is (part of) an assistant span of the right channel
        for r, run in itertools.groupby(zip(labels, roles), lambda x: x[1]):
            if r in (1, 2):
                text = tok.decode([t for t, _ in run])
                assert any(text in span for span in spans[r]), (r, text)
    assert seen[1] > 0 and seen[2] > 0 and seen[0] > 0 and seen[3] == 0


def test_roles_equal_the_mask_dataset_at_the_same_sample_index(shards):
    train, _, _ = _build(shards, [[1.0, shards["kd"]]], split="100,0,0", n=(40, 0, 0))
    tokens_ds = read_shard(shards["kd"])
    masks_ds = read_shard(shards["kd"].replace("_document", "_lossmask_document"))
    # map every document's token sequence to its role sequence, then find each sample in it
    stream_ids = numpy.concatenate([tokens_ds[i] for i in range(len(tokens_ds))]).astype(numpy.int64)
    stream_roles = numpy.concatenate([masks_ds[i] for i in range(len(masks_ds))]).astype(numpy.int64)
    matched = 0
    for i in range(20):
        item = train[i]
        full = torch.cat([item["tokens"][:1], item["labels"]]).numpy()
        # the sample is a contiguous window of the (shuffled-document) stream; locate it by content
        hits = [s for s in range(len(stream_ids) - len(full) + 1)
                if stream_ids[s] == full[0] and numpy.array_equal(stream_ids[s:s + len(full)], full)]
        if not hits:  # windows that span two shuffled documents are not contiguous in file order
            continue
        expected = stream_roles[hits[0] + 1:hits[0] + len(full)]
        assert numpy.array_equal(item["loss_mask"].numpy(), expected)
        matched += 1
    assert matched >= 5


def test_plain_text_is_role_3_and_blend_weights_hold(shards, tmp_path):
    train, _, _ = _build(shards, [[0.25, shards["kd"]], [0.75, shards["text"]]], n=(400, 10, 10), tmp=tmp_path)
    counts = collections.Counter(int(train[i]["dataset_id"]) for i in range(400))
    assert abs(counts[0] / 400 - 0.25) < 0.03 and abs(counts[1] / 400 - 0.75) < 0.03
    for i in range(40):
        item = train[i]
        roles = set(item["loss_mask"].tolist())
        if int(item["dataset_id"]) == 1:
            assert roles <= {0, 3} and 3 in roles
        else:
            assert 3 not in roles


def test_deterministic_per_seed(shards, tmp_path):
    a, _, _ = _build(shards, [[1.0, shards["text"]]], seed=7, tmp=tmp_path / "a")
    b, _, _ = _build(shards, [[1.0, shards["text"]]], seed=7, tmp=tmp_path / "b")
    c, _, _ = _build(shards, [[1.0, shards["text"]]], seed=8, tmp=tmp_path / "c")
    first = [a[i]["tokens"] for i in range(20)]
    assert all(torch.equal(x, b[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c[i]["tokens"]) for i, x in enumerate(first))


def test_one_process_writes_its_index_cache_to_cache_dir(shards, tmp_path):
    """Not into ``<shard prefix>/cache`` beside the shards (megatron-core's fallback without a
    cache path), which fails for read-only data and litters the corpus directory."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shards["dir"], data, ignore=shutil.ignore_patterns("cache", "*_document"))
    _build(shards, [[1.0, str(data / "text.tok_text_document")]], tmp=tmp_path / "cache")
    assert list((tmp_path / "cache").rglob("*.npy"))
    assert not (data / "text.tok_text_document").exists()  # megatron's <prefix>/cache fallback


def test_errors_name_the_problem(shards, tmp_path):
    with pytest.raises(InputError, match=r"data.blend\[0\].*not found"):
        _build(shards, [[1.0, str(tmp_path / "missing_document")]])
    with pytest.raises(InputError, match="valid split empty"):
        _build(shards, [[1.0, shards["kd"]]], split="99.5,0.5,0", n=(10, 5, 0))


def test_mock_data():
    cfg = DataConfig(mock=True, seq_length=16)
    train, valid, _ = build_datasets(cfg, seed=1, num_samples=(8, 2, 2), eod_id=0, pad_id=1, cache_dir="/tmp/unused",
                                     vocab_size=100)
    item = train[0]
    assert item["tokens"].shape == (16,) and set(item["loss_mask"].tolist()) <= {0, 3}


def _two_rank_build(rank, world, prefix, cache, eod, pad):
    cfg = DataConfig(blend=[[1.0, prefix]], seq_length=48, split="90,5,5")
    train, _, _ = build_datasets(cfg, seed=3, num_samples=(64, 4, 4), eod_id=eod, pad_id=pad, cache_dir=cache,
                                 vocab_size=600)
    return [train[i]["tokens"].tolist() for i in range(8)]


def test_two_ranks_share_one_index_cache(shards, tmp_path):
    cache = tmp_path / "cache"
    results = run_distributed(_two_rank_build, 2, shards["text"], str(cache), shards["tok"].eod_id,
                              shards["tok"].pad_id)
    assert results[0] == results[1]
    built = list(cache.rglob("*.npy"))
    assert built and len({p.name for p in built}) == len(built)  # one set of index files, written once
