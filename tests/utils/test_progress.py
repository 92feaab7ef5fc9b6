"""utils.progress: a bar that draws on a terminal reporting 0 columns; plain timed lines, never a carriage return, in a log."""

from __future__ import annotations

import io
import os
import sys

import pytest

from helpers.paths import ROOT
from megatron_vpmoe.utils.progress import Progress


def test_log_gets_plain_lines_every_interval_and_a_last_one():
    log = io.StringIO()  # not a terminal
    with Progress(40, "length-max merges", "tok", stream=log, every_s=0.0) as p:
        p.update(10)
        p.set_postfix(vocab=266)
        p.update(30)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("length-max merges: 10/40 tok (25%) 00:00")
    assert lines[-1].startswith("length-max merges: 40/40 tok (100%)") and lines[-1].endswith("vocab=266")


def test_a_short_run_in_a_log_and_a_disabled_one_stay_quiet():
    log = io.StringIO()
    with Progress(None, "eval bpb", "seq", stream=log) as p:  # well under every_s
        p.update(3)
    with Progress(5, "x", stream=log, enabled=False, every_s=0.0) as p:
        p.update(5)
    assert log.getvalue() == ""


@pytest.mark.parametrize("columns", [0, 100])
def test_bar_draws_on_a_terminal_whatever_size_it_reports(columns):
    """Python's pty reports 0 x 0 (as `docker exec -t` often does): tqdm drew an empty bar there."""
    from helpers.terminal import Terminal

    code = ("import fcntl, struct, sys, termios\n"
            f"fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack('HHHH', 24, {columns}, 0, 0))\n"
            "from megatron_vpmoe.utils.progress import Progress\n"
            "with Progress(3, 'train', 'step') as p:\n"
            "    p.update(1); p.set_postfix(loss='6.2421'); p.update(2)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT)
    term = Terminal([sys.executable, "-c", code], env, str(ROOT))
    assert term.finish(timeout=60) == 0, term.text
    assert "train:" in term.text and "3/3" in term.text and "loss=6.2421" in term.text, repr(term.text)
