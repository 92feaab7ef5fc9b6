"""`vpmoe launch slurm --dry-run` refuses, in one line with exit 2, what the trainer refuses at start on the rendered layout, and inputs that do not exist here (unless --paths-on-cluster)."""

from megatron_vpmoe.cli import main
from helpers.paths import ROOT

CONFIG = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")
MOCK = ["--set", "data.mock=true", "--set", "data.blend=[]", "--set", "data.tokenizer=null"]


def _slurm(tmp_path, capsys, *extra):
    rc = main(["launch", "slurm", "--config", CONFIG, "--set", f"run.dir={tmp_path / 'run'}", "--dry-run", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_global_batch_not_divisible_on_the_rendered_layout_is_exit_2(tmp_path, capsys):
    # the case: global batch 16, micro-batch 8 x data-parallel 8 = 64 on 1 x 8 GPUs
    rc, out, err = _slurm(tmp_path, capsys, "--nodes", "1", "--gpus-per-node", "8",
                          "--set", "train.micro_batch_size=8", *MOCK)
    assert rc == 2 and err.count("\n") == 1, err
    assert "train.global_batch_size" in err and "(64)" in err and "on 1 x 8 ranks" in err
    assert "`vpmoe plan` suggests tp=" in err and "--set train.micro_batch_size=" in err
    assert "#!/bin/bash" not in out and not (tmp_path / "run").exists()


def test_expert_divisibility_names_the_layout_plan_suggests(tmp_path, capsys):
    rc, _, err = _slurm(tmp_path, capsys, "--nodes", "1", "--gpus-per-node", "4", "--set", "parallel.expert=8",
                        "--set", "train.global_batch_size=32", *MOCK)
    assert rc == 2 and err.count("\n") == 1, err
    assert "expert size (8) must divide data x tensor (4)" in err
    suggestion = err.split("`vpmoe plan` suggests ")[1]
    assert suggestion.startswith("tp=") and "--set parallel.expert=" in suggestion
    # the suggestion is a layout the launcher then accepts
    sets = suggestion[suggestion.index("(") + 1: suggestion.rindex(")")].split()
    rc, out, err = _slurm(tmp_path, capsys, "--nodes", "1", "--gpus-per-node", "4", "--set", "parallel.expert=8",
                          "--set", "train.global_batch_size=32", *MOCK, *sets)
    assert rc == 0 and "#!/bin/bash" in out, err


def test_missing_tokenizer_is_exit_2_unless_it_is_on_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data.tokenizer is relative: read from the job's working directory
    args = ["--nodes", "1", "--gpus-per-node", "0", "--set", "data.tokenizer=tokenizers/harmony",
            "--set", "data.mock=true", "--set", "data.blend=[]"]
    rc, out, err = _slurm(tmp_path, capsys, *args)
    assert rc == 2 and err.count("\n") == 1, err
    assert "data.tokenizer" in err and "tokenizers/harmony does not exist" in err and "--paths-on-cluster" in err
    assert "#!/bin/bash" not in out
    rc, out, err = _slurm(tmp_path, capsys, *args, "--paths-on-cluster")
    assert rc == 0 and "#!/bin/bash" in out, err


def test_missing_shard_is_exit_2(tmp_path, capsys):
    rc, _, err = _slurm(tmp_path, capsys, "--gpus-per-node", "0", "--set", "data.tokenizer=null",
                        "--set", f"data.blend=[[1.0, {tmp_path}/nowhere_text_document]]")
    assert rc == 2 and err.count("\n") == 1 and "data.blend[0]" in err and "nowhere_text_document.bin" in err, err


def test_a_tokenizer_larger_than_the_vocabulary_is_exit_2(tmp_path, capsys):
    from megatron_vpmoe.tokenizers.train import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 50], 300)
    tok.save(tmp_path / "tok")
    rc, _, err = _slurm(tmp_path, capsys, "--gpus-per-node", "0", "--set", f"data.tokenizer={tmp_path / 'tok'}",
                        "--set", f"model.vocab_size={tok.vocab_size - 8}", "--set", "data.mock=true", "--set", "data.blend=[]")
    assert rc == 2 and err.count("\n") == 1 and "model.vocab_size" in err and "more than" in err, err
