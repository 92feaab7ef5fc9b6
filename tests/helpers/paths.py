"""The checkout's folders as the tests see them: ROOT (the repository), TESTS, FIXTURES."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
