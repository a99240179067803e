"""deploy/supernode_poll.py: Flower's SuperNode loop with a shorter idle poll."""

import time

import pytest
from flwr.supernode import start_client_internal as loop

from deploy import supernode_poll


@pytest.fixture
def restore_flower():
    yield
    loop.time = time


def test_only_the_idle_sleep_is_shortened(restore_flower):
    supernode_poll.shorten_idle_poll(0.05)
    start = time.monotonic()
    loop.time.sleep(supernode_poll.FLOWER_IDLE_SLEEP)
    assert time.monotonic() - start < 1.0  # 0.05 s instead of Flower's 3 s
    start = time.monotonic()
    loop.time.sleep(0.3)  # the SuperNode's other waits (0.5 s for a reply) are Flower's
    assert time.monotonic() - start >= 0.3
    assert loop.time.time is time.time


def test_a_flower_it_was_not_written_for_is_refused(restore_flower):
    loop.time = object()
    with pytest.raises(RuntimeError, match="not flwr 1.42's"):
        supernode_poll.shorten_idle_poll()
