"""`flower-supernode`, with its idle poll shortened.

Flower 1.42's SuperNode sleeps a fixed 3 s between pulls while no message waits
(`flwr/supernode/start_client_internal.py`), so every message reaches an idle node 1.5 s
late on average, twice a round (train, then evaluate). This runs Flower's own entry point
with that one sleep at IDLE_POLL_SECONDS (the ServerApp's own pull interval,
server/replies.py); every other wait is Flower's. `fedslm supernode` starts the node
through it (`python -m deploy.supernode_poll` takes flower-supernode's arguments).
"""

from __future__ import annotations

import sys
import time
from typing import Any

FLOWER_IDLE_SLEEP = 3  # seconds, flwr 1.42's `time.sleep(3)` when a pull finds nothing
IDLE_POLL_SECONDS = 0.5


class _Clock:
    """The `time` module as the SuperNode's loop sees it, its idle sleep shortened."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll if seconds == FLOWER_IDLE_SLEEP else seconds)


def shorten_idle_poll(poll: float = IDLE_POLL_SECONDS) -> None:
    """Patch Flower's SuperNode loop; RuntimeError if Flower's code is not the one this
    was written against (then the node should not start half-patched)."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time or "time.sleep(3)" not in inspect.getsource(loop):
        raise RuntimeError("this Flower's SuperNode loop is not flwr 1.42's: cannot shorten "
                           "its idle poll")
    loop.time = _Clock(poll)


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    shorten_idle_poll()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
