"""The one base error type of the project: what a user can cause, with its exit code."""

from __future__ import annotations

USAGE = 2  # bad input: a setting, file or folder that cannot be used; nothing ran
FAILED = 1  # the input was fine but the run could not complete


class FedslmError(Exception):
    """An error a user can cause or fix: the command prints its one-line message and
    exits with `exit_code`."""

    exit_code = USAGE


class RunFailed(FedslmError):
    """The federation started but could not go on (no client replied, too few clients)."""

    exit_code = FAILED
