"""`vpmoe distill generate` pieces: prompt files, answer checks, filters, faults and resume.

Faults are injected with a scripted OpenAI-style server (aiohttp, in a thread) whose answers
the test controls: transient 500s, malformed bodies, wrong answers, a server that goes away.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_vpmoe.cli import main as vpmoe
from megatron_vpmoe.utils.answers import answer_matches, predicted_answer, reference_answer
from megatron_vpmoe.distill.generate import GenerateOptions, run_generate
from megatron_vpmoe.distill.prompts import load_prompts
from megatron_vpmoe.utils.errors import InputError, VpmoeError
from helpers.distributed import free_port as _free_port
from helpers.teachers import ScriptedTeacher
from helpers.teachers import scripted_choices as _choices


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_answers():
    assert reference_answer("48/2 = 24\n#### 72") == "72"
    assert reference_answer("#### 1,200") == "1200" and reference_answer("no marker 5") is None
    assert predicted_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert predicted_answer("The answer is $1,200.00.") == "1200"
    assert predicted_answer("we get \\boxed{-3.5} then 9") == "-3.5"
    assert predicted_answer("first 3 then 12") == "12" and predicted_answer("none") is None
    assert answer_matches("The answer is 72.", "72") and not answer_matches("It is 71", "72")


def test_prompt_files(tmp_path):
    good = _write(tmp_path / "p.jsonl", [
        {"question": "Q1?", "answer": "work\n#### 5"},
        "",
        {"id": "x7", "prompt": "Write a haiku."},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "ref"}]},
    ])
    ps = load_prompts([str(good)])
    assert [p.id for p in ps] == ["p.jsonl:1", "x7", "p.jsonl:4"]
    assert ps[0].reference == "5" and ps[0].messages == [{"role": "user", "content": "Q1?"}]
    assert ps[2].messages[-1]["role"] == "user" and ps[2].reference_text == "ref"
    assert len(load_prompts([str(good)], limit=1)) == 1
    cases = {
        "not valid JSON": ["{broken"],
        "none of 'messages'": [{"text": "hi"}],
        "needs string 'role'": [{"messages": [{"role": "user"}]}],
        "no user turn": [{"messages": [{"role": "assistant", "content": "a"}]}],
        "already used": [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}],
        "non-empty string": [{"prompt": "  "}],
    }
    for message, lines in cases.items():
        bad = _write(tmp_path / "bad.jsonl", [{"prompt": "fine"}] + lines)
        with pytest.raises(InputError, match=rf"bad\.jsonl:{len(lines) + 1}: .*{message}"):
            load_prompts([str(bad)])
    with pytest.raises(InputError, match="no such prompt file"):
        load_prompts([str(tmp_path / "nope.jsonl")])


def _records(out: Path, kind: str) -> list:
    return [json.loads(l) for p in sorted(out.glob(f"{kind}-*.jsonl")) for l in p.open()]


def _opts(url, prompts, out, **kw):
    return GenerateOptions(teacher_url=url, prompt_files=[str(prompts)], out_dir=str(out),
                           backoff_s=0.01, progress=False, **kw)


def test_retries_malformed_filters_and_resume(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"question": f"Q{i}?", "answer": "#### 5"} for i in range(6)])
    out = tmp_path / "gen"

    def answer(body, call):
        q = body["messages"][-1]["content"]
        if call == 1:
            return 500, "overloaded"  # transient: retried
        if q == "Q1?":
            return 200, "{not json"  # malformed: counted, skipped
        if q == "Q2?":
            return 200, {"choices": [{"index": 0}]}  # malformed: no message
        if q == "Q3?":
            return 200, _choices(body, final="The answer is 6.")  # wrong answer
        if q == "Q4?":
            return 200, _choices(body, final="")  # empty final
        return 200, _choices(body)

    with ScriptedTeacher(answer) as teacher:
        s = run_generate(_opts(teacher.url, prompts, out, samples=2, concurrency=1, shard_size=3))
    assert s.malformed == 2 and s.retried >= 1
    assert s.accepted == 4 and s.rejected == {"wrong_answer": 2, "too_short": 2}
    acc = _records(out, "shard")
    assert {(r["prompt_id"], r["sample_index"]) for r in acc} == {
        (f"p.jsonl:{i}", j) for i in (1, 6) for j in (0, 1)}
    r = acc[0]
    assert r["teacher_model"] == "scripted" and r["reasoning"].startswith("2+3=5")
    assert r["final"] == "The answer is 5." and r["sampling"]["temperature"] == 1.0
    assert all(x["rejected"] for x in _records(out, "rejected"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_done"] == 8 and summary["total_expected"] == 12

    # resume: only the two malformed prompts are asked again, now answered properly
    asked = []
    with ScriptedTeacher(lambda body, call: (asked.append(body["messages"][-1]["content"]) or 200,
                                             _choices(body))) as teacher:
        s = run_generate(_opts(teacher.url, prompts, out, samples=2, concurrency=2, teacher_moved=True))
    assert sorted(asked) == ["Q1?", "Q2?"] and s.already_done == 8 and s.accepted == 4
    keys = [(r["prompt_id"], r["sample_index"]) for r in _records(out, "shard") + _records(out, "rejected")]
    assert len(keys) == len(set(keys)) == 12

    # duplicates: two identical samples of one prompt -> one kept
    with ScriptedTeacher(lambda body, call: (200, {"choices": [
            {"message": {"content": "The answer is 5.", "reasoning_content": "same"},
             "finish_reason": "stop"}] * body["n"]})) as teacher:
        s = run_generate(_opts(teacher.url, prompts, tmp_path / "dup", samples=3, limit=1))
    assert s.accepted == 1 and s.rejected == {"duplicate": 2}


def test_teacher_unreachable_and_dying(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"question": f"Q{i}?", "answer": "#### 5"} for i in range(5)])
    out = tmp_path / "gen"
    with pytest.raises(VpmoeError, match="not reachable"):
        run_generate(_opts(f"http://127.0.0.1:{_free_port()}", prompts, out))

    def dies_after_two(body, call):
        return (200, _choices(body)) if call <= 2 else (503, "gone")

    with ScriptedTeacher(dies_after_two) as teacher:
        port = teacher.port  # restarted on the same port: the same teacher
        with pytest.raises(VpmoeError, match=r"after 3 attempts.*2 of 5 samples are saved.*resume"):
            run_generate(_opts(teacher.url, prompts, out, concurrency=1, retries=2))
    assert len(_records(out, "shard")) == 2
    with ScriptedTeacher(lambda body, call: (200, _choices(body)), port=port) as teacher:
        s = run_generate(_opts(teacher.url, prompts, out, concurrency=3))
    assert s.already_done == 2 and s.accepted == 3 and len(_records(out, "shard")) == 5


def test_cli_reports_bad_prompt_line(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "[1, 2]"])
    rc = vpmoe(["distill", "generate", "--teacher", "http://127.0.0.1:1", "--prompts", str(bad),
                "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err and "expected a JSON object" in err


def test_completions_endpoint(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "Once upon a time"}])
    bodies = []

    def answer(body, call):
        bodies.append(body)
        return 200, {"usage": {"completion_tokens": 8}, "choices": [
            {"text": f" there was a fox #{i}", "finish_reason": "stop"} for i in range(body["n"])]}

    with ScriptedTeacher(answer) as teacher:
        s = run_generate(_opts(teacher.url, prompts, tmp_path / "gen", samples=2, endpoint="completions",
                               max_tokens=32, temperature=0.3, seed=5))
    assert s.accepted == 2 and s.completion_tokens == 8
    assert bodies[0]["prompt"] == "Once upon a time" and bodies[0]["n"] == 2
    assert bodies[0]["max_tokens"] == 32 and bodies[0]["temperature"] == 0.3 and "seed" in bodies[0]
    recs = _records(tmp_path / "gen", "shard")
    assert [r["final"] for r in recs] == [" there was a fox #0", " there was a fox #1"]
    assert all(r["reasoning"] is None for r in recs)


def test_toy_teacher_cli(tmp_path, shared_data, capsys, o200k):
    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.serve.app import chat_stop_ids

    out = tmp_path / "teacher"
    assert vpmoe(["distill", "toy-teacher", "--gsm8k", str(shared_data / "kd" / "gsm8k_train.jsonl"),
                  "--out", str(out), "--examples", "1", "--steps", "2"]) == 0
    assert "vpmoe serve" in capsys.readouterr().out
    backend = open_backend(str(out))
    assert backend.is_harmony and chat_stop_ids(backend)  # Harmony specials are single tokens
    assert vpmoe(["distill", "toy-teacher", "--out", str(out)]) == 2  # never overwrites silently
    bad = _write(tmp_path / "bad.jsonl", [{"question": "no answer field"}])
    assert vpmoe(["distill", "toy-teacher", "--gsm8k", str(bad), "--out", str(tmp_path / "t2")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_resuming_against_another_teacher_is_refused(tmp_path, capsys):
    """Issue 33 item 6: a re-run against another teacher URL (or model) must not mix two
    teachers' samples in one directory; the same model at a new URL is --teacher-moved."""
    prompts = _write(tmp_path / "p.jsonl", [{"question": f"Q{i}?", "answer": "#### 5"} for i in range(3)])
    out = tmp_path / "gen"
    ok = lambda body, call: (200, _choices(body))  # noqa: E731
    with ScriptedTeacher(ok) as teacher:
        assert run_generate(_opts(teacher.url, prompts, out, limit=1)).accepted == 1
        first = teacher.url
    assert json.loads((out / "teacher.json").read_text()) == {"url": first + "/v1", "model": "scripted"}
    with ScriptedTeacher(ok) as other:
        argv = ["distill", "generate", "--teacher", other.url, "--prompts", str(prompts), "--out", str(out),
                "--no-progress"]
        capsys.readouterr()
        assert vpmoe(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and first in err and other.url in err and "--teacher-moved" in err, err
        assert len(_records(out, "shard")) == 1  # nothing asked, nothing added
        assert vpmoe(argv + ["--teacher-moved"]) == 0  # the same model, moved
        assert len(_records(out, "shard")) == 3
        assert json.loads((out / "teacher.json").read_text())["url"] == other.url + "/v1"
    # another model at the recorded URL: refused even with --teacher-moved
    more = _write(tmp_path / "more.jsonl", [{"question": "Q9?", "answer": "#### 5"}])
    with ScriptedTeacher(ok) as teacher:
        with pytest.raises(InputError, match="teacher model scripted, not other-model"):
            run_generate(GenerateOptions(teacher_url=teacher.url, prompt_files=[str(more)], out_dir=str(out),
                                         model="other-model", teacher_moved=True, progress=False))
