"""``vpmoe experiment tokenizers`` in CI size: 2 variants x 2 seeds on KD chat records (role masks) and
plain text; mean/std of every metric at equal bytes and equal FLOPs; identical documents per
variant; per-run resume; SLURM job scripts; config errors naming the key."""

from __future__ import annotations

import hashlib
import json

import pytest

from megatron_vpmoe.cli import main

CONFIG = """
out: {out}
base_config: {root}/examples/configs/tiny-cpu.yaml
set:
  - model.hidden_size=32
  - model.num_layers=2
  - model.ffn_hidden_size=64
  - model.moe_ffn_hidden_size=16
  - model.moe_shared_expert_intermediate_size=16
  - data.seq_length=32
  - train.global_batch_size=4
  - train.micro_batch_size=4
  - train.eval_interval=4
  - train.eval_iters=1
  - train.schedule.warmup_steps=2
  - log.interval=2
corpus:
  - {{chat: {data}/kd/gsm8k_train.jsonl, user: question, assistant: answer}}
  - {{chat: {data}/kd/bbh_cot_traces.jsonl, user: question, thinking: cot, assistant: target}}
  - {{chat: {data}/kd/self_instruct_seed_messages.jsonl}}
  - {{text: {data}/corpora/tinyshakespeare.txt}}
train_bytes: 8000
valid_bytes: 2000
tokenizer_train_bytes: 8000
seeds: [1, 2]
eval:
  tasks: [bpb, copa, long_context]
  limit: 2
variants:
  - name: bpe-600
    tokenizer: {{bpe: {{vocab_size: 600}}}}
    reference: true
  - name: bpe-400
    tokenizer: {{train: {{kind: bpe, vocab_size: 400}}}}
"""


def _config(tmp, root, data, out="out"):
    cfg = tmp / "exp.yaml"
    cfg.write_text(CONFIG.format(out=tmp / out, root=root, data=data))
    return cfg


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, shared_data, repo_root):
    tmp = tmp_path_factory.mktemp("experiment")
    cfg = _config(tmp, repo_root, shared_data)
    assert main(["experiment", "tokenizers", "--config", str(cfg)]) == 0
    return tmp, cfg


def test_report_has_mean_and_std_for_every_metric_and_both_budgets(experiment):
    from megatron_vpmoe.experiments.report import BYTES_METRICS, FLOPS_METRICS, STABILITY_METRICS

    tmp, _ = experiment
    out = tmp / "out"
    report = json.loads((out / "report.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [
        ("bpe-600", 1), ("bpe-600", 2), ("bpe-400", 1), ("bpe-400", 2)]
    assert report["flops_budget"] > 0
    for name, v in report["variants"].items():
        assert v["seeds"] == [1, 2]
        for key, *_ in BYTES_METRICS + FLOPS_METRICS + STABILITY_METRICS:
            stat = v["metrics"][key]
            assert stat["n"] == 2 and stat["mean"] is not None and stat["std"] is not None, (name, key)
        assert v["metrics"]["score_copa"]["n"] == 2
        # routing was measured: entropy normalised to (0, 1], load max/mean >= 1
        assert 0 < v["metrics"]["router_entropy"]["mean"] <= 1.0
        assert v["metrics"]["expert_load_max_over_mean"]["mean"] >= 1.0
    # the seeds differ (init and data order), so the seed spread is real
    assert report["variants"]["bpe-600"]["metrics"]["final_train_loss"]["std"] > 0
    small, big = report["variants"]["bpe-400"]["metrics"], report["variants"]["bpe-600"]["metrics"]
    assert small["steps"]["mean"] > big["steps"]["mean"]  # more tokens for the same bytes
    assert small["bytes_seen"]["mean"] == pytest.approx(big["bytes_seen"]["mean"], rel=0.2)
    # equal FLOPs: the budget is the smaller total, so one variant is read before its end
    assert min(small["flops"]["mean"], big["flops"]["mean"]) == pytest.approx(report["flops_budget"], rel=0.05)
    verdicts = {(c["metric"], c["verdict"]) for c in report["comparisons"]}
    assert {m for m, _ in verdicts} >= {"valid_bpb", "train_bpb_at_flops", "max_grad_norm"}
    assert {v for _, v in verdicts} <= {"better", "worse", "not distinguishable"}
    table = (out / "report.md").read_text()
    assert "## Budget 1: equal bytes" in table and "## Budget 2: equal training FLOPs" in table
    assert "| bpe-400 | " in table and " ± " in table
    for png in ("loss_vs_bytes.png", "loss_vs_flops.png", "long_context.png", "scores.png"):
        assert (out / png).stat().st_size > 0


def test_every_variant_trained_on_the_same_documents_with_role_masks(experiment):
    """Decode each variant's training shard back to text: the same documents, byte for byte, as
    the experiment's documents file (whose hash every run reports); chat documents carry roles."""
    import numpy

    from megatron_vpmoe.experiments.corpus import documents_digest, read_written
    from megatron_vpmoe.tokenizers import load as load_tokenizer
    from megatron_vpmoe.utils.megatron_import import import_megatron

    IndexedDataset = import_megatron("megatron.core.datasets.indexed_dataset").IndexedDataset
    tmp, _ = experiment
    out = tmp / "out"
    docs = read_written(out / "documents" / "train.jsonl")
    assert any(d.startswith("<|start|>") for d in docs) and any(not d.startswith("<|start|>") for d in docs)
    rows = json.loads((out / "report.json").read_text())["runs"]
    assert {r["documents_sha256"] for r in rows} == {documents_digest(docs)}
    assert len({r["train_documents_bytes"] for r in rows}) == 1
    digests = {}
    for variant in ("bpe-600", "bpe-400"):
        tok = load_tokenizer(out / variant / "tokenizer")
        ds = IndexedDataset(str(out / "shards" / f"train.{variant}_text_document"))
        decoded = [tok.decode([int(i) for i in ds[j][:-1]]) for j in range(len(ds))]  # without EOD
        digests[variant] = documents_digest(decoded)
        masks = IndexedDataset(str(out / "shards" / f"train.{variant}_text_lossmask_document"))
        roles = set(numpy.unique(numpy.concatenate([masks[j] for j in range(len(masks))])).tolist())
        assert {0, 1, 2, 3} <= roles  # prompt, reasoning, final, plain text
    assert digests == {"bpe-600": documents_digest(docs), "bpe-400": documents_digest(docs)}
    assert hashlib.sha256(b"".join(d.encode() for d in docs)).hexdigest()  # non-empty corpus


def test_resume_redoes_only_what_is_missing(experiment):
    tmp, cfg = experiment
    out = tmp / "out"
    kept = (out / "bpe-600" / "seed-1" / "summary.json").stat().st_mtime_ns
    run = out / "bpe-400" / "seed-2"
    metrics = (run / "run" / "metrics.jsonl").read_text()
    (run / "summary.json").unlink()
    (run / "eval" / "results.json").unlink()
    assert main(["experiment", "tokenizers", "--config", str(cfg)]) == 0
    assert (out / "bpe-600" / "seed-1" / "summary.json").stat().st_mtime_ns == kept  # untouched
    assert (run / "summary.json").is_file()
    assert (run / "run" / "metrics.jsonl").read_text() == metrics  # not retrained


def test_slurm_jobs_one_per_variant_and_seed(experiment, capsys):
    """--launch slurm --dry-run: the shared stages here, one `vpmoe train` sbatch script and run
    config per variant x seed (the seed, the variant's shards and vocabulary in each)."""
    from megatron_vpmoe.config import load_config

    tmp, cfg = experiment
    out = tmp / "out"
    assert main(["experiment", "tokenizers", "--config", str(cfg), "--launch", "slurm", "--dry-run",
                 "--gpus-per-node", "0", "--time", "01:00:00"]) == 0
    scripts = sorted((out / "launch").glob("*.sbatch"))
    assert [s.name for s in scripts] == sorted(f"{v}-seed-{s}.sbatch" for v in ("bpe-600", "bpe-400")
                                               for s in (1, 2))
    for variant, seed in (("bpe-600", 1), ("bpe-400", 2)):
        text = (out / "launch" / f"{variant}-seed-{seed}.sbatch").read_text()
        train_yaml = out / variant / f"seed-{seed}" / "train.yaml"
        assert str(train_yaml) in text and "--time=01:00:00" in text
        run = load_config(str(train_yaml))
        assert run.run.seed == seed and run.data.blend[0][1].endswith(f"train.{variant}_text_document")
        assert run.train.eval_interval == 0 and run.checkpoint.load == "auto"  # requeued jobs resume
    assert "wrote" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path, shared_data, repo_root):
    from megatron_vpmoe.experiments.tokenizers import load_experiment_config
    from megatron_vpmoe.utils.errors import ConfigError

    good = CONFIG.format(out=tmp_path / "o", root=repo_root, data=shared_data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good + "colour: blue\n")
    assert main(["experiment", "tokenizers", "--config", str(bad)]) == 2
    cases = [
        (good.replace("{text: ", "{txt: "), r"corpus\[3\]"),
        (good.replace(f"{shared_data}/corpora/tinyshakespeare.txt", f"{shared_data}/eval/gsm8k_test.jsonl"),
         r"corpus\[3\].*eval is not allowed"),
        (good.replace("thinking: cot, assistant: target", "thinking: cot"), r"corpus\[1\].*assistant"),
        (good.replace("{bpe: {vocab_size: 600}}", "{sentencepiece: 3}"), r"variants\[0\]\.tokenizer"),
        (good.replace("seeds: [1, 2]", "seeds: [1, 1]"), "seeds"),
    ]
    for text, match in cases:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_experiment_config(bad)
    (tmp_path / "good.yaml").write_text(good)
    exp = load_experiment_config(tmp_path / "good.yaml", overrides=["train_bytes=2e4", "eval.limit=7", "seeds=[3]"])
    assert exp.train_bytes == 20000 and exp.eval_limit == 7 and exp.seeds == [3]


def test_trained_variant_converts_and_evaluates_the_same(experiment, shared_data):
    """trainer checkpoint -> vpmoe convert to-hf -> vpmoe eval: the HF model gives the same bits
    per byte as the native checkpoint."""
    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.eval.tasks import run_bits_per_byte

    tmp, _ = experiment
    ckpt = tmp / "out" / "bpe-400" / "seed-1" / "run" / "checkpoints"
    assert main(["convert", "to-hf", str(ckpt), str(tmp / "hf-bpe-400")]) == 0
    text = shared_data / "eval" / "mc" / "lambada_openai.jsonl"
    native = run_bits_per_byte(open_backend(str(ckpt)), text, 3)
    hf = run_bits_per_byte(open_backend(str(tmp / "hf-bpe-400")), text, 3)
    assert native["tokens"] == hf["tokens"] and native["bytes"] == hf["bytes"]
    assert hf["bpb"] == pytest.approx(native["bpb"], rel=1e-5)


def test_tokenizer_sources(experiment, tmp_path):
    """{dir: PATH} reuses a directory as it is; {train: ...} calls the library's trainer once
    (a finished directory is reused) and names the variant when the options are wrong."""
    from megatron_vpmoe.experiments.tokenizers import Variant, obtain_tokenizer
    from megatron_vpmoe.tokenizers import load as load_tokenizer
    from megatron_vpmoe.utils.errors import InputError

    tmp, _ = experiment
    docs = tmp / "out" / "documents" / "train.jsonl"
    existing = tmp / "out" / "bpe-400" / "tokenizer"
    assert obtain_tokenizer(Variant("d", "dir", existing), tmp_path / "unused", docs, 8000) == existing
    assert not (tmp_path / "unused").exists()
    with pytest.raises(InputError, match="not found"):
        obtain_tokenizer(Variant("d", "dir", tmp_path / "missing"), tmp_path / "t", docs, 8000)
    made = obtain_tokenizer(Variant("u", "train", {"kind": "unigram", "vocab_size": 400}), tmp_path / "u", docs, 8000)
    tok = load_tokenizer(made)
    ids = tok.encode("the lazy dog")
    assert ids and max(ids) < 400 and tok.decode(ids) == "the lazy dog"
    assert obtain_tokenizer(Variant("u", "train", {"kind": "nonsense", "vocab_size": 1}), made, docs, 8000) == made
    with pytest.raises(InputError, match="variant bad: tokenizer option"):
        obtain_tokenizer(Variant("bad", "train", {"kind": "bpe", "vocab_size": 400, "colour": 1}),
                         tmp_path / "bad", docs, 8000)
    assert not (tmp_path / "bad").exists()


def test_vpmoe_preset_writes_its_slurm_jobs(tmp_path, repo_root, shared_data, capsys):
    """The cluster preset (VPMoE architecture, the planned order) as a dry run at a toy data size:
    stage 1 is the 64k baseline against the o200k Harmony 201k tokenizer; one job per variant x seed."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.experiments.tokenizers import load_experiment_config

    preset = repo_root / "examples" / "experiments" / "tokenizers-vpmoe.yaml"
    exp = load_experiment_config(preset)
    assert [(v.name, v.stage) for v in exp.variants][:2] == [("bpe-64k", 1), ("o200k-harmony-201k", 1)]
    assert sorted({v.stage for v in exp.variants}) == [1, 2, 4] and len(exp.seeds) == 3
    small = ["max_stage=1", "train_bytes=6000", "valid_bytes=2000", "tokenizer_train_bytes=6000",
             "seeds=[1,2]"]
    assert main(["experiment", "tokenizers", "--config", str(preset), "--out", str(tmp_path / "out"),
                 "--launch", "slurm", "--dry-run", "--nodes", "4", *sum((["--set", s] for s in small), [])]) == 0
    scripts = sorted(p.name for p in (tmp_path / "out" / "launch").glob("*.sbatch"))
    assert scripts == ["bpe-64k-seed-1.sbatch", "bpe-64k-seed-2.sbatch", "o200k-harmony-201k-seed-1.sbatch",
                       "o200k-harmony-201k-seed-2.sbatch"]
    run = load_config(str(tmp_path / "out" / "o200k-harmony-201k" / "seed-2" / "train.yaml"))
    assert run.model.num_layers == 80 and run.model.num_moe_experts == 256 and run.model.vocab_size == 201088
    assert "#SBATCH --nodes=" in (tmp_path / "out" / "launch" / "bpe-64k-seed-1.sbatch").read_text()


ONPOLICY = """onpolicy:
  teacher: {{toy: {{gsm8k: {data}/kd/gsm8k_train.jsonl}}}}
  prompts: {data}/kd/gsm8k_train.jsonl
  prompt_limit: 4
  steps: 4
  set: [distill.onpolicy.samples_per_prompt=2, distill.onpolicy.prompts_per_step=2,
        distill.onpolicy.max_new_tokens=8, train.global_batch_size=4, train.micro_batch_size=4]
"""


def test_onpolicy_section_and_the_best_run(tmp_path, shared_data, repo_root):
    """The on-policy stage's config is checked up front (one line naming the key), and the student
    is the variant with the lowest mean held-out bpb (its first seed)."""
    from megatron_vpmoe.experiments.onpolicy import best_run
    from megatron_vpmoe.experiments.tokenizers import load_experiment_config
    from megatron_vpmoe.utils.errors import ConfigError

    good = CONFIG.format(out=tmp_path / "o", root=repo_root, data=shared_data) + ONPOLICY.format(data=shared_data)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(good)
    exp = load_experiment_config(cfg)
    assert exp.onpolicy["steps"] == 4 and "toy" in exp.onpolicy["teacher"]
    for old, new, key in (("teacher: {toy:", "teacher: {vllm:", "onpolicy.teacher"),
                          ("steps: 4", "steps: 0", "onpolicy.steps"),
                          ("prompt_limit: 4", "prompt_limit: 4\n  colour: 1", "onpolicy.colour")):
        cfg.write_text(good.replace(old, new))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_experiment_config(cfg)
    rows = [{"variant": "a", "seed": 1, "valid_bpb": 2.0}, {"variant": "a", "seed": 2, "valid_bpb": 2.2},
            {"variant": "b", "seed": 2, "valid_bpb": 2.05}, {"variant": "b", "seed": 1, "valid_bpb": 2.1}]
    assert (best_run(rows, [1, 2])["variant"], best_run(rows, [1, 2])["seed"]) == ("b", 1)


@pytest.mark.long
def test_onpolicy_stage_end_to_end(experiment, shared_data):
    """The best variant distilled on-policy against the toy teacher served by `vpmoe serve`
    (about 70 s on 2 cores): teacher scores before/after in the report, resumable."""
    tmp, cfg = experiment
    with_op = tmp / "exp-onpolicy.yaml"
    with_op.write_text(cfg.read_text() + ONPOLICY.format(data=shared_data))
    assert main(["experiment", "tokenizers", "--config", str(with_op)]) == 0
    report = json.loads((tmp / "out" / "report.json").read_text())
    op = report["onpolicy"]
    assert op["steps"] == 4 and len(op["scores"]) == 4
    assert op["variant"] in report["variants"] and op["score_before"] < 0 and op["score_after"] < 0
    assert "## On-policy distillation of the best variant" in (tmp / "out" / "report.md").read_text()
    mtime = (tmp / "out" / "onpolicy" / "result.json").stat().st_mtime_ns
    assert main(["experiment", "tokenizers", "--config", str(with_op)]) == 0
    assert (tmp / "out" / "onpolicy" / "result.json").stat().st_mtime_ns == mtime  # done: not rerun


@pytest.mark.long
def test_cpu_preset_reduced(tmp_path, repo_root):
    """The shipped CPU preset (every variant's trainer: BPE, pruned o200k, Length-MAX) at a fifth
    of its text and two seeds (several minutes on 2 cores)."""
    config = repo_root / "examples" / "experiments" / "tokenizers-cpu.yaml"
    assert main(["experiment", "tokenizers", "--config", str(config), "--out", str(tmp_path / "out"),
                 "--set", "train_bytes=200000", "--set", "seeds=[1,2]", "--set", "eval.limit=5",
                 "--set", "onpolicy=null"]) == 0  # the on-policy stage has its own test
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["variants"]) == ["bpe-8k", "pruned-o200k-8k", "lengthmax-6k", "bpe-4k"]
    assert all(v["metrics"]["valid_bpb"]["n"] == 2 for v in report["variants"].values())


def test_corpus_sources_mix_round_robin(tmp_path):
    """Plain text, a JSONL field and chat records (messages, or named fields with reasoning) are
    interleaved one document at a time; chats become Harmony text; a bad record names file:line."""
    from megatron_vpmoe.experiments.corpus import Source, iter_documents, read_splits
    from megatron_vpmoe.utils.errors import InputError

    (tmp_path / "a.txt").write_text("plain one")
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "field one"}) + "\n" + json.dumps({"body": "field two"}) + "\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"q": "2+2?", "why": "two and two", "a": "4"}) + "\n")
    sources = [Source("text", tmp_path / "a.txt"), Source("jsonl", tmp_path / "f.jsonl", field="body"),
               Source("chat", tmp_path / "m.jsonl"),
               Source("chat", tmp_path / "q.jsonl", fields={"user": "q", "thinking": "why", "assistant": "a"})]
    splits = read_splits(sources, {"train": 20, "valid": 1000})
    train, valid = splits["train"], splits["valid"]
    assert train[:2] == ["plain one\n", "field one"]  # one document from each source in turn
    assert train[2].startswith("<|start|>") and "<|channel|>final<|message|>hello<|return|>" in train[2]
    assert len(train) == 3 and valid[1] == "field two" and len(valid) == 2
    assert "<|channel|>analysis<|message|>two and two<|end|>" in valid[0]  # reasoning: the analysis channel
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: no string field 'body'"):
        list(iter_documents(Source("jsonl", tmp_path / "bad.jsonl", field="body")))
