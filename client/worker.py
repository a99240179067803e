"""A SuperNode's long-lived model process: a device loads its model once per run.

Flower starts a fresh ClientApp process for every message (train, evaluate), and loading
torch and the model there took about half of every round. `fedslm supernode`
(deploy/launch.py) therefore starts this worker next to `flower-supernode` and gives the
ClientApp its socket in the node config (`worker`). The ClientApp (client/app.py) only
forwards the message here and packs the reply; the worker runs the round with the model
it keeps loaded (client/cache.py) across messages and runs, and loads it again only when
a run changes the model (another model, quantization, LoRA rank or targets, ...).

The socket is an AF_UNIX socket in the node's state folder (mode 0600); a connection is
authenticated with the 32-byte key in `worker.key` next to it (mode 0600), written anew
by `fedslm supernode` at every start. Requests are served one at a time:

    request  (kind, config, node_config, arrays): kind "train" or "evaluate"; the message's
             ConfigRecord and the node config as plain dicts; the received adapter
    reply    ("ok", (arrays, metrics, info)), ("dropout", reason) for a simulated dropout,
             or ("error", one line)

This module's top level needs only the standard library and contracts/: the ClientApp
imports it to call the worker and must not pay for torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from contracts.errors import FAILED, FedslmError

KEY_FILE = "worker.key"  # next to the socket; deploy/launch.py writes it
FAMILY = "AF_UNIX"
TRAIN, EVALUATE = "train", "evaluate"
OK, DROPOUT, ERROR = "ok", "dropout", "error"
Request = tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]

log = logging.getLogger("fedslm.worker")


class WorkerError(FedslmError):
    """The worker could not be reached, or the round failed in it (its one line)."""

    exit_code = FAILED


def key_path(address: str | Path) -> Path:
    return Path(address).with_name(KEY_FILE)


def dropout_reason(rate: float) -> str:
    """The error reply of a simulated dropout, the same in and out of the worker."""
    return f"simulated dropout (dropout-rate={rate:g})"


# --- the ClientApp's side ---------------------------------------------------------------

def call(address: str, kind: str, config: dict[str, Any], node_config: dict[str, Any],
         arrays: dict[str, Any]) -> tuple[str, Any]:
    """Send one request to the worker at `address` and return its ("ok" | "dropout", body);
    WorkerError for an unreachable worker or an error reply."""
    try:
        authkey = key_path(address).read_bytes()
        conn = Client(address, family=FAMILY, authkey=authkey)
    except (OSError, EOFError, AuthenticationError) as exc:
        raise WorkerError(f"the fedslm worker at {address} is unreachable "
                          f"({_one_line(exc)}): is its `fedslm supernode` running?") from None
    with conn:
        try:
            conn.send((kind, config, node_config, arrays))
            status, body = conn.recv()
        except (OSError, EOFError) as exc:
            raise WorkerError(f"the fedslm worker at {address} stopped before it replied "
                              f"({_one_line(exc)}); see the node's log") from None
    if status == ERROR:
        raise WorkerError(str(body))
    return status, body


# --- the worker's side ------------------------------------------------------------------

def run_round(kind: str, config: dict[str, Any], node_config: dict[str, Any],
               arrays: dict[str, Any]) -> tuple[str, Any]:
    """Run a train or evaluate round in this process: ("ok", (arrays, metrics, info)) or
    ("dropout", reason). The worker's requests and the ClientApp's own rounds (no worker)
    both come here; errors are raised."""
    from client.rounds import evaluate_round, simulated_dropout, train_round
    from client.settings import ClientSettings

    settings = ClientSettings.from_records(dict(config), dict(node_config))
    if kind == EVALUATE:
        return OK, evaluate_round(settings, dict(arrays))
    if simulated_dropout(settings):  # an error reply, as from a device that failed
        return DROPOUT, dropout_reason(settings.dropout_rate)
    return OK, train_round(settings, dict(arrays))


def handle(request: Any) -> tuple[str, Any]:
    """One request's reply; never raises."""
    try:
        kind, config, node_config, arrays = request
    except (TypeError, ValueError):
        return ERROR, "a worker request is (kind, config, node_config, arrays)"
    if kind not in (TRAIN, EVALUATE):
        return ERROR, f"unknown request kind {kind!r} (expected {TRAIN!r} or {EVALUATE!r})"
    try:
        return run_round(kind, config, node_config, arrays)
    except FedslmError as exc:
        log.warning("%s failed: %s", kind, _one_line(exc))
        return ERROR, _one_line(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the ClientApp, the worker goes on
        log.exception("%s failed", kind)
        return ERROR, f"{type(exc).__name__}: {_one_line(exc)}"


class Worker:
    """Serves requests on one socket, one at a time, and counts its model loads."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.loads = 0
        self.served = 0

    def serve_one(self, conn: Connection) -> None:
        from client.cache import Session

        try:
            request = conn.recv()
        except Exception as exc:  # noqa: BLE001 - a peer that sent nothing usable
            log.warning("unreadable request: %s", _one_line(exc))
            return
        kind = request[0] if isinstance(request, tuple) and request else "?"
        before, started = Session.loaded_model(), time.perf_counter()
        reply = handle(request)
        loaded = Session.loaded_model()
        if loaded is not None and loaded is not before:
            self.loads += 1
            log.info("model loaded (load #%d): %s, quantization %s", self.loads,
                     loaded.source, loaded.quantization.mode)
        self.served += 1
        log.info("%s request #%d: %s in %.1fs", kind, self.served, reply[0],
                 time.perf_counter() - started)
        try:
            conn.send(reply)
        except OSError as exc:  # the ClientApp's process was stopped meanwhile
            log.warning("could not send the reply: %s", _one_line(exc))

    def serve(self, stop_after: int | None = None) -> None:
        try:
            authkey = key_path(self.address).read_bytes()
        except OSError as exc:
            raise WorkerError(f"cannot read the worker's key: {_one_line(exc)}") from None
        with _listener(self.address, authkey) as listener:
            log.info("listening on %s (pid %d)", self.address, os.getpid())
            while stop_after is None or self.served < stop_after:
                try:
                    conn = listener.accept()
                except (AuthenticationError, EOFError, OSError) as exc:
                    log.warning("refused a connection: %s", _one_line(exc))
                    continue
                with conn:
                    self.serve_one(conn)


def _listener(address: str, authkey: bytes) -> Listener:
    """The listening socket, created 0600 (only this user can connect at all)."""
    old = os.umask(0o177)
    try:
        return Listener(address, family=FAMILY, backlog=16, authkey=authkey)
    except OSError as exc:
        raise WorkerError(f"cannot listen on {address}: {_one_line(exc)}") from None
    finally:
        os.umask(old)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _configure_logging() -> None:
    """The worker's lines, the rounds' lines and their progress go to stderr: the node's log."""
    for name, prefix in (("fedslm.worker", "fedslm worker"), ("fedslm", "fedslm")):
        logger = logging.getLogger(name)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}: %(message)s",
                                               "%H:%M:%S"))
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _exit_with_parent() -> None:
    """Stop when the process that started this one (`fedslm supernode`) is gone, also when
    it was killed (on Linux `fedslm supernode` also asks the kernel for this)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-monitor").start()


def _exit(signum: int, _frame: object) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split(
        "\n")[0])
    p.add_argument("--address", required=True, help="the AF_UNIX socket to listen on; its "
                   f"key is read from {KEY_FILE} next to it")
    args = p.parse_args(argv)
    _configure_logging()
    _exit_with_parent()
    signal.signal(signal.SIGTERM, _exit)  # closing the listener removes the socket
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import client.rounds  # noqa: F401 - torch and the stack before the socket says "ready"

    try:
        Worker(args.address).serve()
    except FedslmError as exc:
        print(f"fedslm worker: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
