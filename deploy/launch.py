"""`fedslm superlink` and `fedslm supernode`: Flower's own deployment processes, started
with TLS, SuperNode authentication and the settings that keep their traffic on the
addresses given (no telemetry, no update check, no hub, no runtime `uv sync`).

`fedslm superlink` (and `fedslm supernode --no-worker`) replaces itself with Flower's
process (`flower-superlink`, `flower-supernode`), so signals and exit codes are Flower's.
`fedslm supernode` stays the parent of two processes: the node's worker
(`python -m client.worker`, the long-lived process that keeps the model loaded, see
client/worker.py) and `flower-supernode`, whose ClientApps forward each message to the
worker. It forwards SIGINT/SIGTERM to both, stops the other when one exits and exits with
flower-supernode's code.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from contracts import environment
from contracts.config import ConfigError, validate_node
from contracts.errors import FAILED, FedslmError
from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY

log = logging.getLogger("fedslm")
CONNECTION = "fedslm"
INSECURE_WARNING = ("fedslm: WARNING: --insecure: TLS is OFF. Adapters, metrics and node "
                    "credentials cross the network in the clear. Use it only on a closed test "
                    "network.")


# The worker's files in the node's state folder. client/worker.py reads the key next to
# the socket (KEY_FILE there); deploy/ may not import client/, hence the names twice.
WORKER_SOCKET, WORKER_KEY = "worker.sock", "worker.key"
SOCKET_PATH_MAX = 103  # bytes of an AF_UNIX path (104 on macOS, 108 on Linux, with its NUL)
WORKER_READY_SECONDS = 300.0  # importing torch on a slow device
STOP_SECONDS = 30.0  # a child's graceful exit before it is killed


class DeployError(FedslmError):
    """A missing certificate or key, or an unusable option."""


class NodeFailed(FedslmError):
    """The node's worker could not start."""

    exit_code = FAILED


def node_environ(flwr_home: Path) -> dict[str, str]:
    """The environment of a SuperLink or SuperNode (and of the apps they start)."""
    return {**environment.quiet_environ(), "FLWR_HOME": str(flwr_home)}


def _need(path: Path, what: str) -> str:
    if not path.is_file():
        raise DeployError(f"{what} not found: {path}")
    return str(path.resolve())


def write_connection(flwr_home: Path, address: str, ca: Path | None) -> Path:
    """A `flwr` connection named `fedslm` for `flwr run . fedslm` and `flwr supernode`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    lines.append(f'root-certificates = "{ca.resolve()}"' if ca else "insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def superlink_command(certs: Path | None, address: str, port: int, state: Path,
                      insecure: bool) -> list[str]:
    check_port(port, "--port")
    command = ["flower-superlink", "--host", address, "--port", str(port),
               "--database", str(state / "superlink.db"),
               "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    if certs is None:
        raise DeployError("give --certs (made by `fedslm certs`) or ask for --insecure")
    return command + ["--ssl-ca-certfile", _need(certs / CA_CERT, "CA certificate"),
                      "--ssl-certfile", _need(certs / SERVER_CERT, "SuperLink certificate"),
                      "--ssl-keyfile", _need(certs / SERVER_KEY, "SuperLink key"),
                      "--enable-supernode-auth"]


NODE_CONFIG_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # Flower's own pattern


def check_address(address: str, what: str = "--superlink") -> str:
    """HOST:PORT with a host name or IP address and a port in 1..65535."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c in host for c in " /"):
        raise DeployError(f"{what} must be HOST:PORT, got {address!r}")
    return address


def check_port(port: int, what: str) -> int:
    if not 0 < port < 65536:
        raise DeployError(f"{what} must be a port in 1..65535, got {port}")
    return port


def parse_node_config(text: str) -> dict[str, object]:
    """Flower's `--node-config` string ("k=v k2='s'") as a dict, with fedslm's keys
    checked by the config schema's rules: a bad value is refused before the node starts."""
    from flwr.common.config import parse_config_args

    if NODE_CONFIG_PAIR.sub("", text).strip():
        raise DeployError(f"--node-config must be key=value pairs, got {text!r}")
    try:
        parsed = parse_config_args([text]) if text.strip() else {}
    except Exception:  # noqa: BLE001 - Flower raises click and TOML errors
        raise DeployError("--node-config values must be numbers, true/false or quoted "
                          f"strings (key='text'), got {text!r}") from None
    try:
        validate_node(parsed)
    except ConfigError as exc:
        raise DeployError(f"--node-config: {exc}") from None
    return parsed


def supernode_command(ca: Path | None, key: Path | None, superlink: str, port: int,
                      state: Path, node_config: str, insecure: bool,
                      worker: Path | None = None) -> list[str]:
    """The node's state folder holds its ledger, its model cache and Flower's app store;
    `worker` is the socket of the node's worker (None: each ClientApp loads the model)."""
    check_address(superlink)
    check_port(port, "--port")
    if "worker" in parse_node_config(node_config):
        raise DeployError("--node-config: `worker` is set by `fedslm supernode` itself")
    settings = f"state-dir={_toml(state)} cache-dir={_toml(state / 'cache')}"
    if worker is not None:
        settings += f" worker={_toml(worker)}"
    command = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1",
               "--port", str(port), "--node-config", f"{settings} {node_config}".strip()]
    if key is not None:
        command += ["--auth-supernode-private-key", _need(key, "SuperNode private key")]
    if insecure:
        return command + ["--insecure"]
    if ca is None:
        raise DeployError("give --ca (the federation's CA certificate) or ask for --insecure")
    return command + ["--root-certificates", _need(ca, "CA certificate")]


def _toml(path: Path) -> str:
    return '"' + str(path.resolve()).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run(command: list[str], flwr_home: Path) -> None:
    """Replace this process with Flower's."""
    env = node_environ(flwr_home)
    executable = Path(sys.executable).parent / command[0]
    print("fedslm: " + shlex.join(command), file=sys.stderr, flush=True)
    os.execve(executable, command, env)


def start_superlink(certs: Path | None, address: str, port: int, state: Path,
                    insecure: bool) -> None:
    command = superlink_command(certs, address, port, state, insecure)  # checks first
    _warn_if(insecure)
    state.mkdir(parents=True, exist_ok=True)
    flwr_home = state / "flwr"
    config = write_connection(flwr_home, f"{address}:{port}",
                              None if insecure else certs / CA_CERT)
    print(f"fedslm: connection {CONNECTION!r} in {config}; for `flwr`:\n"
          f"  export FLWR_HOME={flwr_home.resolve()} FLWR_TELEMETRY_ENABLED=0 "
          "FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
          file=sys.stderr, flush=True)
    run(command, flwr_home)


def start_supernode(ca: Path | None, key: Path | None, superlink: str, port: int, state: Path,
                    node_config: str, insecure: bool, worker: bool = True) -> int:
    """Start the node; with `worker`, its worker first (the exit code is flower-supernode's),
    without, replace this process with flower-supernode."""
    address = worker_socket(state) if worker else None
    command = supernode_command(ca, key, superlink, port, state, node_config, insecure,
                                address)
    _warn_if(insecure)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    if address is None:
        run(command, state / "flwr")
    return supervise(command, state / "flwr", address)


def worker_socket(state: Path) -> Path:
    path = state.resolve() / WORKER_SOCKET
    if len(os.fsencode(str(path))) > SOCKET_PATH_MAX:
        raise DeployError(f"--state: the worker's socket {path} would be longer than "
                          f"{SOCKET_PATH_MAX} bytes; give a shorter state folder (or "
                          "--no-worker)")
    return path


def supervise(command: list[str], flwr_home: Path, address: Path) -> int:
    """Start the worker, wait until it listens, start flower-supernode; forward SIGINT and
    SIGTERM to both; when one exits, stop the other. flower-supernode's exit code."""
    env = node_environ(flwr_home)
    _free_socket(address)
    key = address.with_name(WORKER_KEY)
    _write_key(key)
    children: dict[str, subprocess.Popen] = {}
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for child in children.values():
            _signal(child, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        children["worker"] = _spawn([sys.executable, "-m", "client.worker",
                                     "--address", str(address)], env)
        _wait_ready(address, children["worker"], received)
        if received:
            return _stop_all(children, received)
        print("fedslm: " + shlex.join(command), file=sys.stderr, flush=True)
        children["node"] = _spawn([sys.executable, "-m", "deploy.supernode_poll",
                                   *command[1:]], env)
        while all(child.poll() is None for child in children.values()):
            time.sleep(0.2)
        if children["worker"].poll() is not None and not received:
            print(f"fedslm: the worker exited (code {children['worker'].returncode}); "
                  "stopping the SuperNode", file=sys.stderr, flush=True)
        return _stop_all(children, received or [signal.SIGTERM])
    finally:
        for child in children.values():  # an error above: nothing outlives this process
            if child.poll() is None:
                _kill(child)
        for s, handler in previous.items():
            signal.signal(s, handler)
        for path in (address, key):
            path.unlink(missing_ok=True)


def _stop_all(children: dict[str, subprocess.Popen], received: list[int]) -> int:
    """Stop what still runs (with the signal received, else SIGTERM); the node's code."""
    for child in children.values():
        if child.poll() is None:
            _signal(child, received[0])
    deadline = time.monotonic() + STOP_SECONDS
    for child in children.values():
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(child)
    node = children.get("node")
    if node is None:  # stopped before flower-supernode started
        return 128 + received[0]
    code = node.returncode
    worker = children["worker"].returncode
    return code if code or worker in (0, -signal.SIGTERM, -signal.SIGINT) else FAILED


def _spawn(command: list[str], env: dict[str, str],
           executable: str | None = None) -> subprocess.Popen:
    """A child in a process group of its own (a terminal's Ctrl-C reaches it once, from
    here) that dies with this process, also when this one is killed (Linux)."""
    return subprocess.Popen(command, executable=executable, env=env, process_group=0,
                            preexec_fn=_die_with_parent())


def _die_with_parent() -> Callable[[], None] | None:
    """For the child, before it runs: be killed when this process dies (Linux's
    PR_SET_PDEATHSIG; libc is looked up here, not in the forked child)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1  # linux/prctl.h
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def _signal(child: subprocess.Popen, signum: int) -> None:
    """The child's whole process group: flower-supernode with its SuperExec and ClientApps."""
    if child.poll() is None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass


def _kill(child: subprocess.Popen) -> None:
    _signal(child, signal.SIGKILL)
    child.wait()


def _wait_ready(address: Path, worker: subprocess.Popen, received: list[int]) -> None:
    deadline = time.monotonic() + WORKER_READY_SECONDS
    while not address.exists() and not received:
        if worker.poll() is not None:
            raise NodeFailed(f"the node's worker exited with code {worker.returncode} before "
                             "it listened (its error is above)")
        if time.monotonic() > deadline:
            raise NodeFailed(f"the node's worker did not listen on {address} within "
                             f"{WORKER_READY_SECONDS:.0f}s")
        time.sleep(0.1)


def _free_socket(address: Path) -> None:
    """Remove a socket left by a node that was killed; refuse one that is in use."""
    if not os.path.lexists(address):
        return
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(address))
        except OSError:
            address.unlink()
            return
    raise DeployError(f"a worker already listens on {address}: is another `fedslm "
                      f"supernode` running with --state {address.parent}?")


def _write_key(path: Path) -> None:
    """32 random bytes, readable by this user only (0600 from creation on)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))


def _warn_if(insecure: bool) -> None:
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
