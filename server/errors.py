"""Why a federation stops or a round is skipped."""

from __future__ import annotations

from contracts.errors import RunFailed


class FederationError(RunFailed):
    """The federation cannot go on (no client replied, too few clients)."""


class TooFewUpdates(FederationError):
    """A round has fewer usable updates than `min-replies`: it is skipped."""
