"""Shared helpers of the test suite (no tests here): test modules import these, never each other."""
