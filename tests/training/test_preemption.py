"""training.preemption: the first Ctrl-C asks for a checkpoint like SIGTERM, the second aborts; one resume hint."""

from __future__ import annotations

import os
import signal

import pytest

from megatron_vpmoe.training.preemption import LAUNCHER_ENV, PreemptionHandler


def test_first_ctrl_c_requests_a_save_second_aborts(monkeypatch, capsys):
    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    handler = PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested() and handler.received == signal.SIGINT
        assert capsys.readouterr().err.count("Ctrl-C again to abort") == 1
        assert handler.saved_message("ck/step_00000007", 7) == \
            "interrupted: saved ck/step_00000007 at step 7; run the same command again to resume"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_a_launcher_the_ranks_leave_the_hint_and_notice_to_it(monkeypatch, capsys):
    monkeypatch.setenv(LAUNCHER_ENV, "1")
    handler = PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.uninstall()
    assert capsys.readouterr().err == ""
    assert handler.saved_message("p", 3) == "interrupted: saved p at step 3"


def test_sigterm_stays_a_preemption_that_requeues(monkeypatch):
    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    handler = PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after a preemption notice: still one save
    finally:
        handler.uninstall()
    assert handler.requested()
    assert handler.saved_message("p", 3).startswith("interrupted: saved p at step 3")
