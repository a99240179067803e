"""A device's own ClientApp process: it serves the SuperNode's messages with the code the
owner installed, never with the coordinator's app bundle.

Flower 1.42 runs the app bundle that `flwr run` uploads on every SuperNode: a fresh
`flwr-clientapp` process installs it and imports it, as the device's OS user, with the
device's data, ledger and keys in reach. `fedslm supernode` (deploy/launch.py) therefore
starts `flower-supernode --isolation process`, which starts no app process itself, and
starts this process in Flower's SuperExec's place. It asks the SuperNode's Runtime API
(on 127.0.0.1, with the SuperExec secret only the owner's account can read) for each
ClientApp task, pulls the message and serves it with client/device.py under the owner's
policy. The bundle's hash is logged; the bundle is never installed or imported. The
model stays loaded across messages and runs (client/cache.py).

The policy, the node config and the state folder come from this process's command line
(the owner's `fedslm supernode`); nothing the SuperNode or the coordinator sends sets them.

Flower internals this relies on (flwr is pinned to 1.42.0): the Runtime API's
AcquireTask and its SuperExec authentication, `pull_task_input`, `push_message` and
`push_task_output` of flwr.supernode.runtime.run_clientapp, HeartbeatSender.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.errors import FedslmError

if TYPE_CHECKING:
    from client.device import Device

POLL_SECONDS = 0.5  # between AcquireTask calls while no message waits
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"

log = logging.getLogger("fedslm.worker")


def serve(runtime: str, secret: bytes, device: Device) -> None:
    """Take the SuperNode's ClientApp tasks one at a time, for ever, and serve each with
    `device`."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    client = _runtime_client(runtime, [
        RuntimeVersionHttpInterceptor(component_name="SuperExec"),
        SuperExecAuthHttpInterceptor(master_secret=secret,
                                     protected_methods=frozenset({ACQUIRE_METHOD}))])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                 agentapp_fab_hashes=[])
    served = loads = 0
    log.info("serving the SuperNode at %s (pid %d)", runtime, os.getpid())
    while True:
        try:
            res = client.AcquireTask(request)
        except Exception as exc:  # noqa: BLE001 - the SuperNode is starting or restarting
            log.debug("no task: %s", exc)
            time.sleep(POLL_SECONDS)
            continue
        if not (res.HasField("task") and res.token):
            time.sleep(POLL_SECONDS)
            continue
        started, before = time.perf_counter(), _loaded()
        kind, outcome = run_task(runtime, res.token, device)
        served += 1
        loaded = _loaded()
        if loaded is not None and loaded is not before:
            loads += 1
            log.info("model loaded (load #%d): %s, quantization %s", loads, loaded.source,
                     loaded.quantization.mode)
        log.info("%s task #%d: %s in %.1fs", kind, served, outcome,
                 time.perf_counter() - started)


def _loaded():
    """The model the process holds (client.cache.LoadedModel), or None."""
    from client.cache import Session

    return Session.loaded_model()


def run_task(runtime: str, token: str, device: Device) -> tuple[str, str]:
    """Pull one task's message, serve it, push the reply; (message type, outcome)."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _runtime_client(runtime, [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(_heartbeat(client))
    context, status, kind, outcome = None, SubStatus.FAILED, "?", "failed"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        kind = message.metadata.message_type
        log.info("run %s: %s message; the coordinator's app bundle %s (%s) is not run "
                 "here", run.run_id, kind, run.fab_id or "?", fab.hash_str[:12])
        reply = device.handle(message, coordinator_of(run))
        push_message(client, reply, context)
        status = SubStatus.COMPLETED
        outcome = f"error reply {reply.error.reason}" if reply.has_error() else "ok"
    except Exception:  # noqa: BLE001 - one task's failure must not stop the device
        log.exception("a task failed")
    finally:
        try:
            push_task_output(client=client, context=context, sub_status=status, details="")
        except Exception:  # noqa: BLE001 - the SuperNode expires the task itself
            log.exception("could not close the task")
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return kind, outcome


def coordinator_of(run: object) -> str:
    """Who submitted the run, as the SuperLink says: its account and federation."""
    account = getattr(run, "flwr_aid", "") or getattr(run, "account_name", "") or "-"
    return f"account {account}, federation {getattr(run, 'federation_id', '') or '-'}"


def _runtime_client(runtime: str, interceptors: list) -> object:
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=runtime, insecure=True, root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker())


def _heartbeat(client: object):
    """Flower's task heartbeat, without its SIGINT to this process when the SuperNode
    no longer knows the task (that ends the task here, not the device)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception:  # noqa: BLE001 - retried by the sender
            return False

    return beat


def _configure_logging() -> None:
    """The worker's lines, the rounds' lines and their progress go to stderr: the node's log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedslm: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedslm")
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
    p = argparse.ArgumentParser(prog="python -m client.worker",
                                description=__doc__.split("\n")[0])
    p.add_argument("--runtime", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    p.add_argument("--secret", required=True, help="the SuperExec secret's file")
    p.add_argument("--policy", required=True, help="the owner's policy file")
    p.add_argument("--state", required=True, help="the node's state folder")
    p.add_argument("--superlink", default="", help="the SuperLink this node serves")
    p.add_argument("--node-config", default="{}", help="the node's own keys, as JSON")
    args = p.parse_args(argv)
    _configure_logging()
    _exit_with_parent()
    signal.signal(signal.SIGTERM, _exit)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        device = make_device(args)
        secret = Path(args.secret).read_bytes()
        import client.rounds  # noqa: F401 - torch and the stack before the first task

        serve(args.runtime, secret, device)
    except (FedslmError, OSError) as exc:
        print(f"fedslm worker: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        return 0
    return 0


def make_device(args: argparse.Namespace) -> Device:
    from client.device import Device
    from client.policy import checked_node_config, load_policy
    from privacy.device_record import DeviceState

    policy = load_policy(args.policy)
    node = checked_node_config(json.loads(args.node_config))
    state = Path(args.state).resolve()
    with DeviceState(state) as record:
        record.record_policy(policy.to_json())
    log.info("policy %s: lifetime budget epsilon %g (delta %g), at most epsilon %g per run, "
             "DP %s", policy.source, policy.budget_epsilon, policy.budget_delta,
             policy.per_run_epsilon, "optional" if policy.allow_non_dp else "required")
    return Device(policy, node, state, args.superlink)


if __name__ == "__main__":
    sys.exit(main())
