"""Every CLI subcommand on hostile input (binary, truncated, empty, huge numbers, NaN, control
characters): no traceback, exit 2 (or 0 where the input is legitimately fine), and nothing
published on failure; plus the exact cases of issue 20 item 7 that used to traceback.

Commands run in-process through ``megatron_vpmoe.cli.main`` (an exception escaping it is what a
user would see as a traceback); only what must run in its own process does.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from megatron_vpmoe.cli import main
from helpers.paths import ROOT

CONFIG = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")

HOSTILE = {
    "binary": bytes(range(256)) * 64,
    "truncated": gzip.compress(b'{"text": "hello world"}\n' * 300)[:60],
    "empty": b"",
    "huge": b'{"text": 1e999, "prompt": 123456789012345678901234567890, "question": 1e999, "answer": 1}\n'
            b'train: {steps: 123456789012345678901234567890}\n',
    "nan": b'{"text": NaN, "prompt": NaN, "question": NaN, "answer": NaN}\nlr: .nan\n',
    "control": b'{"text": "a\\u0000b\\u001b[2J", "prompt": "\\u0000"}\n\x00\x01\x1b[2J\r\n\x7f',
}


def _call(argv, capsys):
    """(exit code, stderr, exception text or None) of ``vpmoe argv`` in this process."""
    error = None
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        code, error = None, traceback.format_exc()
    return code, capsys.readouterr().err, error


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    text = tmp_path_factory.mktemp("text") / "t.txt"
    text.write_text((ROOT / "README.md").read_text()[:20000])
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--input", str(text),
                 "--output", str(out)]) == 0
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _file(tmp_path, kind, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[kind])
    return path


def _dir_of(tmp_path, kind, names):
    d = tmp_path / "hostile_dir"
    d.mkdir()
    for name in names:
        (d / name).write_bytes(HOSTILE[kind])
    return d


def _hf_dir_with_hostile_weights(tmp_path, kind):
    """A plausible GPT-2 directory (valid config.json) whose model.safetensors is hostile."""
    d = _dir_of(tmp_path, kind, ["model.safetensors"])
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 1,
                                               "vocab_size": 16, "n_positions": 16, "bos_token_id": 0,
                                               "eos_token_id": 0}))
    return d


# (name, argv builder (tmp, kind, tok) -> (argv, output path that must not appear on failure))
CASES = {
    "config validate": lambda t, k, tok: (["config", "validate", _file(t, k, "c.yaml")], None),
    "config show": lambda t, k, tok: (["config", "show", _file(t, k, "c.yaml")], None),
    "train": lambda t, k, tok: (["train", "--config", _file(t, k, "c.yaml")], None),
    "launch slurm": lambda t, k, tok: (["launch", "slurm", "--config", _file(t, k, "c.yaml"), "--gpus-per-node", "0",
                                        "--dry-run"], None),
    "launch local": lambda t, k, tok: (["launch", "local", "--config", _file(t, k, "c.yaml")], None),
    "launch mpi": lambda t, k, tok: (["launch", "mpi", "--config", _file(t, k, "c.yaml")], None),
    "distill onpolicy": lambda t, k, tok: (["distill", "onpolicy", "--config", _file(t, k, "c.yaml")], None),
    "experiment tokenizers": lambda t, k, tok: (["experiment", "tokenizers", "--config", _file(t, k, "e.yaml"),
                                                 "--out", t / "out"], t / "out"),
    "tokenizer train": lambda t, k, tok: (["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--input",
                                           _file(t, k, "c.jsonl:text"), "--output", t / "out"], t / "out"),
    "tokenizer train txt": lambda t, k, tok: (["tokenizer", "train", "--kind", "lengthmax", "--vocab-size", "300",
                                               "--input", _file(t, k, "c.txt"), "--output", t / "out"], t / "out"),
    "tokenizer get": lambda t, k, tok: (["tokenizer", "get", "harmony", "--ranks", _file(t, k, "r.tiktoken"),
                                         "--output", t / "out"], t / "out"),
    "tokenizer eval input": lambda t, k, tok: (["tokenizer", "eval", "--tokenizers", tok, "--input",
                                                _file(t, k, "c.txt"), "--report", t / "out"], t / "out"),
    "tokenizer eval dir": lambda t, k, tok: (["tokenizer", "eval", "--tokenizers",
                                              _dir_of(t, k, ["tokenizer.json", "vpmoe_tokenizer.json"]), "--input",
                                              ROOT / "README.md", "--report", t / "out"], t / "out"),
    "preprocess": lambda t, k, tok: (["preprocess", "--input", _file(t, k, "c.jsonl"), "--output-prefix", t / "out",
                                      "--tokenizer", tok, "--no-progress"], t / "out.bpe_text_document.bin"),
    "preprocess gz": lambda t, k, tok: (["preprocess", "--input", _file(t, k, "c.jsonl.gz"), "--output-prefix",
                                         t / "out", "--tokenizer", tok, "--no-progress"],
                                        t / "out.bpe_text_document.bin"),
    "preprocess inspect": lambda t, k, tok: (["preprocess", "inspect", _dir_of(t, k, ["p.bin", "p.idx"]) / "p"],
                                             None),
    "preprocess merge": lambda t, k, tok: (["preprocess", "merge", "--inputs", _dir_of(t, k, ["p.bin", "p.idx"]) / "p",
                                            "--output-prefix", t / "out"], t / "out.bin"),
    "distill generate": lambda t, k, tok: (["distill", "generate", "--teacher", "http://127.0.0.1:9", "--prompts",
                                            _file(t, k, "p.jsonl"), "--out", t / "out", "--retries", "0",
                                            "--timeout", "2"], t / "out"),
    "distill build-corpus": lambda t, k, tok: (["distill", "build-corpus", "--generated",
                                                _dir_of(t, k, ["shard-00000.jsonl", "summary.json"]), "--out", t / "out",
                                                "--tokenizer", tok], t / "out"),
    "distill toy-teacher": lambda t, k, tok: (["distill", "toy-teacher", "--gsm8k", _file(t, k, "g.jsonl"),
                                               "--out", t / "out", "--steps", "1", "--examples", "1"], t / "out"),
    "convert to-hf": lambda t, k, tok: (["convert", "to-hf", _dir_of(t, k, ["latest", "config.yaml", ".metadata"]),
                                         t / "out"], t / "out"),
    "convert from-hf": lambda t, k, tok: (["convert", "from-hf",
                                           _dir_of(t, k, ["config.json", "model.safetensors", "vpmoe_config.yaml"]),
                                           t / "out"], t / "out"),
    "eval hf": lambda t, k, tok: (["eval", _dir_of(t, k, ["config.json", "model.safetensors", "tokenizer.json"]),
                                   "--tasks", "bpb", "--limit", "1", "--out", t / "out"], t / "out"),
    # a hostile directory can never load, so serve fails before it binds (a free port regardless)
    "serve": lambda t, k, tok: (["serve", _dir_of(t, k, ["config.json", "model.safetensors", "tokenizer.json"]),
                                 "--port", _free_port()], None),
    "serve weights": lambda t, k, tok: (["serve", _hf_dir_with_hostile_weights(t, k), "--port", _free_port()], None),
    "eval hf weights": lambda t, k, tok: (["eval", _hf_dir_with_hostile_weights(t, k), "--tasks", "bpb", "--limit",
                                           "1", "--out", t / "out"], t / "out"),
    "eval native": lambda t, k, tok: (["eval", _dir_of(t, k, ["latest", "config.yaml"]), "--tasks", "bpb",
                                       "--limit", "1", "--out", t / "out"], t / "out"),
}



@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("command", sorted(CASES))
def test_cli_on_hostile_input(command, kind, tmp_path, tok, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, output = CASES[command](tmp_path, kind, tok)
    code, err, error = _call(argv, capsys)
    assert error is None, error
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code:
        lines = [ln for ln in err.splitlines() if ln.startswith("vpmoe") or "error" in ln.lower()]
        assert len(lines) == 1, err
        if output is not None:
            assert not Path(output).exists(), f"{output} published by a failed run"


@pytest.mark.parametrize("argv, key", [
    (["config", "validate", CONFIG, "--set", "train.optimizer.lr=nan"], "train.optimizer.lr"),
    (["config", "show", CONFIG, "--set", "model.hidden_size=123456789012345678901234567890"], "model.hidden_size"),
    (["config", "validate", CONFIG, "--set", "train.optimizer.beta2=.inf"], "train.optimizer.beta2"),
    (["config", "validate", CONFIG, "--set", "run.name=a\x00b"], "run.name"),  # YAML refuses NUL
    (["tokenizer", "train", "--kind", "bpe", "--vocab-size", "123456789012345678901234567890", "--input",
      CONFIG, "--output", "OUT"], "vocab"),
    (["convert", "to-hf", "nowhere", "OUT", "--max-shard-size", "nan"], "--max-shard-size"),
    (["eval", "nowhere", "--limit", "-5"], "--limit"),
    (["distill", "onpolicy", "--config", str(ROOT / "examples" / "configs" / "distill-onpolicy.yaml"), "--set",
      "distill.teacher_url=file:///etc/passwd"], "distill.teacher_url"),
    (["distill", "onpolicy", "--config", str(ROOT / "examples" / "configs" / "distill-onpolicy.yaml"), "--set",
      "distill.onpolicy.teacher_tokenizer=/nonexistent/teacher"], "distill.onpolicy.teacher_tokenizer"),
    (["launch", "slurm", "--config", CONFIG, "--gpus-per-node", "0", "--dry-run", "--time", "1:00\x1b[2J"], "--time"),
])
def test_hostile_arguments_are_one_line(argv, key, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, err, error = _call(argv, capsys)
    assert error is None, error
    assert code == 2 and err.count("\n") == 1 and key in err, err
    assert not (tmp_path / "out").exists()


# ---- issue 20 item 7, case by case -----------------------------------------------------------

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=2", "model.kv_channels=16", "model.ffn_hidden_size=64",
        "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32", "data.seq_length=32",
        "data.mock=true", "data.tokenizer=null", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.schedule.warmup_steps=1", "train.eval_interval=0", "log.progress_bar=false", "train.steps=2"]


def _sets(*items):
    return [a for item in (*TINY, *items) for a in ("--set", item)]


def _child(cases):
    """Run several ``vpmoe`` invocations in one fresh process (training must not share this
    process's state); returns [(exit code, stderr)]. An escaping exception is reported as such."""
    script = r"""
import contextlib, io, json, sys, traceback
from megatron_vpmoe.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code = None
            traceback.print_exc()
    out.append((code, "\n".join(l for l in err.getvalue().splitlines() if "Warning" not in l and "warnings.warn" not in l)))
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_training_errors_are_one_line_before_step_1(tmp_path, tok):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    results = _child([
        ["train", "--config", CONFIG, *_sets(f"run.dir={blocker}/run")],  # unwritable run dir
        ["train", "--config", CONFIG, *_sets(f"run.dir={tmp_path}/tp", "parallel.tensor=2")],  # 1 process
        ["train", "--config", CONFIG, *_sets(f"run.dir={tmp_path}/vocab", "model.vocab_size=128",
                                             f"data.tokenizer={tok}")],  # 300-token tokenizer, 128 rows
    ])
    (c1, e1), (c2, e2), (c3, e3) = results
    assert c1 == 2 and e1.count("\n") == 0 and str(blocker) in e1, e1
    assert c2 == 2 and e2.count("\n") == 0 and "parallel" in e2 and "world size 1" in e2, e2
    assert c3 == 2 and e3.count("\n") == 0 and "model.vocab_size" in e3 and "300" in e3, e3
    assert not (tmp_path / "vocab" / "metrics.jsonl").exists()


def test_unwritable_outputs_are_one_line(tmp_path, tok, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 50)
    for argv in (["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--input", text, "--output",
                  blocker / "tok"],
                 ["preprocess", "--input", text, "--output-prefix", blocker / "x", "--tokenizer", tok,
                  "--no-progress"],
                 ["convert", "to-hf", tmp_path / "no_ckpt", blocker / "hf"],
                 ["convert", "from-hf", tmp_path / "no_hf", blocker / "ck"]):
        code, err, error = _call(argv, capsys)
        assert error is None and code == 2, (argv, error, err)
        assert err.count("\n") == 1 and str(blocker) in err or "no_" in err, (argv, err)


def test_launch_local_layout_and_rank_errors_exit_2(tmp_path, capsys):
    code, err, error = _call(["launch", "local", "--nproc", "3", "--config", CONFIG,
                              *_sets(f"run.dir={tmp_path}/a", "parallel.tensor=2")], capsys)
    assert error is None and code == 2 and err.count("\n") == 1 and "world size 3" in err, err
    # missing data: the rank's own one line and exit 2, not torchrun's 1 and traceback
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", "launch", "local", "--nproc", "1",
                          "--config", CONFIG, *_sets(f"run.dir={tmp_path}/b", "data.mock=false",
                                                     f"data.blend=[[1.0, {tmp_path}/missing]]")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "missing" in res.stderr


def test_toy_teacher_default_data_does_not_depend_on_the_working_directory(tmp_path, capsys, monkeypatch, o200k):
    from megatron_vpmoe.eval.tasks import DEFAULT_FEWSHOT_FILE

    if not DEFAULT_FEWSHOT_FILE.is_file():
        pytest.skip(f"{DEFAULT_FEWSHOT_FILE} is missing")
    monkeypatch.chdir(tmp_path)  # outside the checkout: ../shared does not exist from here
    code, err, error = _call(["distill", "toy-teacher", "--out", tmp_path / "t", "--steps", "1",
                              "--examples", "1"], capsys)
    assert error is None and code == 0, (error, err)
    assert (tmp_path / "t" / "config.json").is_file()


# ---- issue 33: a hostile teacher, for `vpmoe distill generate` ---------------------------------

def _prompts(tmp_path, n=2):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": "#### 5"}) + "\n" for i in range(n)))
    return path


def _generate(tmp_path, url, *extra):
    return ["distill", "generate", "--teacher", url, "--prompts", _prompts(tmp_path), "--out", tmp_path / "out",
            "--timeout", "1", "--retries", "1", "--max-response-bytes", str(1 << 20), "--no-progress", *extra]


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("vpmoe") or "error" in ln.lower()]
    assert len(lines) == 1, err
    return lines[0]


# what the one line says (exit 1): the probe fails (not reachable / not OpenAI-compatible), a
# transient failure runs out of retries, or every answer was malformed (naming why)
HOSTILE_TEACHER = {
    "slow": "did not answer", "never": "did not answer", "huge": "--max-response-bytes",
    "huge_chunked": "--max-response-bytes", "nested": "nested deeper than", "garbage": "not JSON",
    "schema": "without (choices|data)", "500": "HTTP 500", "429": "HTTP 429", "disconnect": "did not answer",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("probe", [True, False], ids=["generation", "probe"])
@pytest.mark.parametrize("mode", sorted(HOSTILE_TEACHER))
def test_distill_generate_against_a_hostile_teacher(mode, probe, tmp_path, capsys):
    """Every way a teacher can misbehave, at the capability probe or at generation: one line,
    a non-zero exit, no traceback, bounded time and memory, nothing accepted."""
    import resource
    import time

    from helpers.teachers import ScriptedTeacher, hostile_answer

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with ScriptedTeacher(hostile_answer(mode), probe=probe) as teacher:
        code, err, error = _call(_generate(tmp_path, teacher.url), capsys)
    elapsed = time.monotonic() - start
    assert error is None, error
    assert "Traceback" not in err, err
    line = _one_error_line(err)
    assert code == 1, (code, err)  # the teacher failed (exit 2 is for bad flags and inputs)
    if not probe:
        assert "not reachable or not an OpenAI-compatible server" in line, line
    assert re.search(HOSTILE_TEACHER[mode], line), line
    assert elapsed < 20, f"{mode}: {elapsed:.1f}s with --timeout 1 --retries 1"
    # no answer is buffered past --max-response-bytes (1 MiB): ru_maxrss is KiB on Linux
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024
    assert not list((tmp_path / "out").glob("shard-*.jsonl"))


@pytest.mark.timeout(60)
def test_distill_generate_timeout_0_is_refused_and_a_silent_teacher_is_bounded(tmp_path, capsys):
    """Issue 33 item 1 exactly: `--timeout 0 --retries 0` against a server that never answers."""
    from helpers.teachers import ScriptedTeacher, hostile_answer

    with ScriptedTeacher(hostile_answer("never"), probe=False) as teacher:
        argv = ["distill", "generate", "--teacher", teacher.url, "--prompts", _prompts(tmp_path), "--out",
                tmp_path / "out", "--timeout", "0", "--retries", "0"]
        code, err, error = _call(argv, capsys)
        assert error is None and code == 2 and err.count("\n") == 1 and "--timeout" in err, err
        argv[argv.index("0")] = "0.5"
        code, err, error = _call(argv, capsys)
    assert error is None and code == 1 and "did not answer" in _one_error_line(err), err


@pytest.mark.timeout(60)
def test_distill_generate_names_the_reason_when_every_request_is_refused(tmp_path, capsys):
    from helpers.teachers import ScriptedTeacher

    refuse = {"error": {"message": "'temperature' must be a finite number, got nan", "code": 400}}
    with ScriptedTeacher(lambda body, call: (400, refuse)) as teacher:
        code, err, error = _call(_generate(tmp_path, teacher.url), capsys)
    assert error is None and code == 1, (code, err)
    line = _one_error_line(err)
    assert "none of the 2 requests" in line and "HTTP 400" in line and "must be a finite number" in line, line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags, key", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--retries", "-1"], "--retries"),
    (["--timeout", "0"], "--timeout"), (["--timeout", "-3"], "--timeout"), (["--timeout", "inf"], "--timeout"),
    (["--max-response-bytes", "0"], "--max-response-bytes"), (["--max-tokens", "0"], "--max-tokens"),
    (["--teacher", "file:///etc/passwd"], "--teacher"), (["--teacher", "127.0.0.1:8000"], "--teacher"),
])
def test_distill_generate_flags_out_of_range_are_one_line(flags, key, tmp_path, capsys):
    argv = ["distill", "generate", "--teacher", "http://127.0.0.1:9", "--prompts", _prompts(tmp_path),
            "--out", tmp_path / "out", *flags]
    code, err, error = _call(argv, capsys)
    assert error is None and code == 2 and err.count("\n") == 1 and key in err, err
    assert not (tmp_path / "out").exists()
