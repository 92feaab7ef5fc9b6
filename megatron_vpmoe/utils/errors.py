"""User-facing error types and the process exit codes the CLI and launchers agree on.

Any error a user can fix (bad config, bad flag, bad input file) is raised as a
:class:`VpmoeError` subclass; the CLI prints its message on one line and exits with
its ``exit_code`` instead of dumping a traceback.
"""

from __future__ import annotations

# Exit codes shared by the CLI, the trainer and the launchers.
EXIT_OK = 0
EXIT_FAILURE = 1  # a real failure: launchers must not requeue
EXIT_USAGE = 2  # bad flags, bad config, bad input: fix and re-run
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint saved after SIGTERM/SIGUSR1, requeue me


class VpmoeError(Exception):
    """An error the user can act on; printed without a traceback."""

    exit_code = EXIT_FAILURE


class UsageError(VpmoeError):
    """Bad command-line usage."""

    exit_code = EXIT_USAGE


class ConfigError(VpmoeError):
    """An invalid configuration: names the file and the key."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.message = message
        self.key = key
        self.file = file
        where = ":".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def with_file(self, file: str) -> "ConfigError":
        """The same error, naming ``file`` (unless it already names one)."""
        return self if self.file else ConfigError(self.message, key=self.key, file=file)


class InputError(VpmoeError):
    """Bad input data (a corpus, a prompt file, a tokenizer directory)."""

    exit_code = EXIT_USAGE
