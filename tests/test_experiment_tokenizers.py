"""``vpmoe experiment tokenizers`` end to end in CI size: two variants, every report column
filled, per-variant resume, and config errors naming the key."""

from __future__ import annotations

import json

import pytest

from megatron_vpmoe.cli import main

CONFIG = """
out: {out}
base_config: examples/configs/tiny-cpu.yaml
set:
  - model.hidden_size=32
  - model.num_layers=2
  - model.ffn_hidden_size=64
  - model.moe_ffn_hidden_size=16
  - model.moe_shared_expert_intermediate_size=16
  - data.seq_length=32
  - train.global_batch_size=4
  - train.micro_batch_size=4
  - train.eval_interval=5
  - train.eval_iters=1
  - train.schedule.warmup_steps=2
corpus: ../shared/data/corpora/tinyshakespeare.txt
train_bytes: 8000
valid_bytes: 2000
tokenizer_train_bytes: 8000
eval:
  tasks: [bpb, copa, lambada, long_context]
  limit: 2
variants:
  - name: bpe-600
    tokenizer: {{bpe: {{vocab_size: 600}}}}
    reference: true
  - name: bpe-300
    tokenizer: {{bpe: {{vocab_size: 300}}}}
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("experiment")
    cfg = tmp / "exp.yaml"
    cfg.write_text(CONFIG.format(out=tmp / "out"))
    assert main(["experiment", "tokenizers", "--config", str(cfg)]) == 0  # paths: relative to the project
    return tmp, cfg


def test_report_has_every_column_for_every_variant(experiment):
    tmp, _ = experiment
    out = tmp / "out"
    rows = json.loads((out / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["bpe-600", "bpe-300"]
    for r in rows:
        for key in ("tokens_per_char", "sequence_length_inflation", "embedding_head_params",
                    "embedding_head_share_of_active", "final_train_loss", "final_train_bpb", "loss_spikes",
                    "max_grad_norm", "valid_bpb", "eval_bpb", "long_context_degradation", "wall_time_s"):
            assert r[key] is not None, (r["variant"], key)
        assert set(r["scores"]) == {"copa", "lambada"}
        assert r["curve"] and r["curve"][-1]["bytes_seen"] > 0
    small, big = rows[1], rows[0]
    # same active non-embedding parameters; the smaller vocabulary has fewer embedding params,
    # more tokens per character (inflation > 1) and therefore more steps for the same bytes
    assert small["active_non_embedding_params"] == big["active_non_embedding_params"]
    assert small["embedding_head_params"] < big["embedding_head_params"]
    assert small["sequence_length_inflation"] > 1.0 == big["sequence_length_inflation"]
    assert small["steps"] > big["steps"]
    assert small["bytes_seen"] == pytest.approx(big["bytes_seen"], rel=0.15)
    table = (out / "report.md").read_text()
    assert "| bpe-300 |" in table and " - |" not in table  # no empty cell
    for png in ("loss_vs_bytes.png", "long_context.png", "scores.png"):
        assert (out / png).stat().st_size > 0


def test_resume_redoes_only_what_is_missing(experiment):
    tmp, cfg = experiment
    out = tmp / "out"
    kept = (out / "bpe-600" / "summary.json").stat().st_mtime_ns
    metrics = (out / "bpe-300" / "run" / "metrics.jsonl").read_text()
    (out / "bpe-300" / "summary.json").unlink()
    (out / "bpe-300" / "eval" / "results.json").unlink()
    assert main(["experiment", "tokenizers", "--config", str(cfg)]) == 0
    assert (out / "bpe-600" / "summary.json").stat().st_mtime_ns == kept  # untouched
    assert (out / "bpe-300" / "summary.json").is_file()
    assert (out / "bpe-300" / "run" / "metrics.jsonl").read_text() == metrics  # not retrained


def test_config_errors_name_the_key(tmp_path, shared_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.format(out=tmp_path / "o") + "colour: blue\n")
    assert main(["experiment", "tokenizers", "--config", str(bad)]) == 2
    bad.write_text(CONFIG.format(out=tmp_path / "o").replace(
        "corpus: ../shared/data/corpora/tinyshakespeare.txt", f"corpus: {shared_data / 'eval' / 'gsm8k_test.jsonl'}"))
    from megatron_vpmoe.eval.experiment import load_experiment_config
    from megatron_vpmoe.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"corpus\[0\].*eval is not allowed"):
        load_experiment_config(bad)
    bad.write_text(CONFIG.format(out=tmp_path / "o").replace("{bpe: {vocab_size: 300}}", "{sentencepiece: 3}"))
    with pytest.raises(ConfigError, match=r"variants\[1\]\.tokenizer"):
        load_experiment_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG.format(out=tmp_path / "o"))
    exp = load_experiment_config(good, overrides=["train_bytes=2e4", "eval.limit=7"])
    assert exp.train_bytes == 20000 and exp.eval_limit == 7


def test_trained_variant_converts_and_evaluates_the_same(experiment, shared_data):
    """trainer checkpoint -> vpmoe convert to-hf -> vpmoe eval: the HF model gives the same bits
    per byte as the native checkpoint."""
    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.eval.tasks import run_bits_per_byte

    tmp, _ = experiment
    ckpt = tmp / "out" / "bpe-300" / "run" / "checkpoints"
    assert main(["convert", "to-hf", str(ckpt), str(tmp / "hf-bpe-300")]) == 0
    text = shared_data / "eval" / "mc" / "lambada_openai.jsonl"
    native = run_bits_per_byte(open_backend(str(ckpt)), text, 3)
    hf = run_bits_per_byte(open_backend(str(tmp / "hf-bpe-300")), text, 3)
    assert native["tokens"] == hf["tokens"] and native["bytes"] == hf["bytes"]
    assert hf["bpb"] == pytest.approx(native["bpb"], rel=1e-5)


def test_tokenizer_sources(experiment, tmp_path):
    """{dir: PATH} reuses a directory as it is; {command: ARGS} runs `vpmoe tokenizer train`
    with {out} substituted and reports a failure naming the command."""
    from megatron_vpmoe.eval.experiment import Variant, obtain_tokenizer
    from megatron_vpmoe.utils.errors import InputError

    tmp, _ = experiment
    existing = tmp / "out" / "bpe-300" / "tokenizer"
    assert obtain_tokenizer(Variant("d", "dir", existing), tmp_path / "unused", [], []) == existing
    assert not (tmp_path / "unused").exists()
    with pytest.raises(InputError, match="not found"):
        obtain_tokenizer(Variant("d", "dir", tmp_path / "missing"), tmp_path / "t", [], [])
    # a real (tiny) `vpmoe tokenizer train` through a command variant, {corpus}/{out} substituted
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200
                      + "pack my box with five dozen liquor jugs. " * 200)
    args = ["--kind", "bpe", "--vocab-size", "300", "--input", "{corpus}", "--output", "{out}"]
    made = obtain_tokenizer(Variant("c", "command", args), tmp_path / "tok", [], [corpus])
    assert made == tmp_path / "tok" and made.is_dir()
    from megatron_vpmoe.tokenizers import load
    tok = load(made)
    ids = tok.encode("the lazy dog")
    assert ids and max(ids) < 300 and tok.decode(ids) == "the lazy dog"
    # done earlier: reused, the command does not run again
    assert obtain_tokenizer(Variant("c", "command", ["--bogus"]), tmp_path / "tok", [], [corpus]) == made
    # a failing command: the error names the command and the variant
    with pytest.raises(InputError, match=r"variant bad: 'vpmoe tokenizer train --kind nonsense .*' failed"):
        obtain_tokenizer(Variant("bad", "command", ["--kind", "nonsense", "--vocab-size", "300",
                                                     "--input", "{corpus}", "--output", "{out}"]),
                         tmp_path / "bad", [], [corpus])
    assert not (tmp_path / "bad").exists()


def test_every_tokenizer_kind_end_to_end(tmp_path, shared_data):
    """The project's real tokenizer kinds through the runner in CI size: the o200k Harmony teacher
    (a `vpmoe tokenizer get` directory, 201,088 ids), and unigram / Length-MAX / pruned-o200k
    trained by `vpmoe tokenizer train` command variants; every column filled, the same active
    non-embedding parameters and the same training bytes for all."""
    assert main(["tokenizer", "get", "harmony", "--output", str(tmp_path / "harmony")]) == 0
    train = '[--vocab-size, 600, --input, "{{corpus}}", --output, "{{out}}", --max-bytes, 8000, --kind, '
    variants = f"""variants:
  - name: harmony
    tokenizer: {{{{dir: {tmp_path / "harmony"}}}}}
    reference: true
  - name: unigram-600
    tokenizer: {{{{command: {train}unigram]}}}}
  - name: lengthmax-600
    tokenizer: {{{{command: {train}lengthmax]}}}}
  - name: pruned-600
    tokenizer: {{{{command: {train}pruned]}}}}
"""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text((CONFIG.split("variants:")[0] + variants).format(out=tmp_path / "out"))
    assert main(["experiment", "tokenizers", "--config", str(cfg)]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["harmony", "unigram-600", "lengthmax-600", "pruned-600"]
    assert rows[0]["vocab_size"] == 201088
    assert all(r["vocab_size"] == 600 for r in rows[1:])
    assert len({r["active_non_embedding_params"] for r in rows}) == 1
    assert {r["train_bytes_budget"] for r in rows} == {8000}
    for r in rows:  # the same bytes of text, up to the last step (4 x 32 tokens) rounding up
        assert 8000 <= r["bytes_seen"] <= 8000 + 128 * r["bytes_per_token"] + 1e-6, r["variant"]
    for r in rows:
        assert all(v is not None for v in r.values()), r
        assert r["tokens_per_char"] > 0 and r["eval_bpb"] > 0
    # the 201k vocabulary packs the most text per token
    assert rows[0]["tokens_per_char"] < min(r["tokens_per_char"] for r in rows[1:])


@pytest.mark.long
def test_tiny_preset_end_to_end(tmp_path, repo_root):
    """The shipped tiny preset, full size (about 5 minutes on 2 cores)."""
    config = repo_root / "examples" / "experiments" / "tokenizers.yaml"
    assert main(["experiment", "tokenizers", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["bpe-8k", "bpe-2k", "bpe-512"]
    assert all(r["valid_bpb"] is not None and r["eval_bpb"] is not None for r in rows)
