"""`fedslm superlink` and `fedslm supernode`: Flower's own deployment processes, started
with TLS, SuperNode authentication and the settings that keep their traffic on the
addresses given (no telemetry, no update check, no hub, no runtime `uv sync`).

`fedslm superlink` replaces itself with `flower-superlink`, so signals and exit codes are
Flower's. `fedslm supernode` checks the owner's policy file, then stays the parent of two
processes: `flower-supernode --isolation process` (which starts no app process, so the
coordinator's app bundle never runs on the device) and the device's worker
(`python -m client.worker`, the owner's installed ClientApp under the policy, keeping the
model loaded; see client/worker.py). They share a SuperExec secret (0600) for the
SuperNode's Runtime API on 127.0.0.1. It forwards SIGINT/SIGTERM to both, stops the other
when one exits and exits with flower-supernode's code.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import signal
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


SECRET_FILE = "superexec.secret"  # in the node's state folder, 0600, new at each start
LOCK_FILE = "node.lock"  # held by the one `fedslm supernode` of a state folder
STOP_SECONDS = 30.0  # a child's graceful exit before it is killed
NO_WORKER = ("--no-worker is gone: it ran the coordinator's app bundle with this device's "
             "data, ledger and keys in reach. A device always runs its own installed "
             "ClientApp under its policy (docs/deployment.md); a coordinator you trust can "
             "run plain `flower-supernode`")


class DeployError(FedslmError):
    """A missing certificate or key, or an unusable option."""


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
                      state: Path, insecure: bool) -> list[str]:
    """flower-supernode in process isolation: its Runtime API on 127.0.0.1:`port`, open
    for tasks only to a holder of the state folder's SuperExec secret."""
    check_address(superlink)
    check_port(port, "--port")
    command = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1",
               "--port", str(port), "--isolation", "process",
               "--superexec-auth-secret-file", str(state.resolve() / SECRET_FILE)]
    if key is not None:
        command += ["--auth-supernode-private-key", _need(key, "SuperNode private key")]
    if insecure:
        return command + ["--insecure"]
    if ca is None:
        raise DeployError("give --ca (the federation's CA certificate) or ask for --insecure")
    return command + ["--root-certificates", _need(ca, "CA certificate")]


def worker_command(port: int, state: Path, policy: Path, superlink: str,
                   node_config: dict[str, object]) -> list[str]:
    return [sys.executable, "-m", "client.worker", "--runtime", f"127.0.0.1:{port}",
            "--secret", str(state.resolve() / SECRET_FILE), "--policy", str(policy.resolve()),
            "--state", str(state.resolve()), "--superlink", superlink,
            "--node-config", json.dumps(node_config)]


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
                    node: dict[str, object], insecure: bool, policy: Path) -> int:
    """Start the node and its worker (the policy and node config were checked by the
    caller); the exit code is flower-supernode's."""
    command = supernode_command(ca, key, superlink, port, state, insecure)
    _warn_if(insecure)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    _lock(state)
    return supervise(command, worker_command(port, state, policy, superlink, node),
                     state / "flwr", state / SECRET_FILE)


def supervise(command: list[str], worker: list[str], flwr_home: Path, secret: Path) -> int:
    """Start flower-supernode and the device's worker; forward SIGINT and SIGTERM to
    both; when one exits, stop the other. flower-supernode's exit code."""
    env = node_environ(flwr_home)
    _write_secret(secret)
    children: dict[str, subprocess.Popen] = {}
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for child in children.values():
            _signal(child, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print("fedslm: " + shlex.join(command), file=sys.stderr, flush=True)
        children["node"] = _spawn([sys.executable, "-m", "deploy.supernode_poll",
                                   *command[1:]], env)
        children["worker"] = _spawn(worker, env)
        if received:  # a signal that came before the worker was there
            _signal(children["worker"], received[0])
        while all(child.poll() is None for child in children.values()):
            time.sleep(0.2)
        if children["worker"].poll() is not None and not received:
            print(f"fedslm: the worker exited (code {children['worker'].returncode}); "
                  "stopping the SuperNode", file=sys.stderr, flush=True)
        return _stop_all(children, received)
    finally:
        for child in children.values():  # an error above: nothing outlives this process
            if child.poll() is None:
                _kill(child)
        for s, handler in previous.items():
            signal.signal(s, handler)
        secret.unlink(missing_ok=True)


def _stop_all(children: dict[str, subprocess.Popen], received: list[int]) -> int:
    """Wait for the children to stop: those a received signal already reached are left to
    finish (a second signal would cut flower-supernode's goodbye to the SuperLink short);
    after a child's own exit, the other is sent SIGTERM. The node's exit code."""
    if not received:
        for child in children.values():
            _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for child in children.values():
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(child)
    node = children.get("node")
    if node is None:  # stopped before flower-supernode started
        return 128 + (received or [signal.SIGTERM])[0]
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


def _lock(state: Path) -> None:
    """Hold the state folder for this process's life (the kernel lets go when it ends, also
    when it is killed): two nodes on one ledger and one SuperExec secret are refused."""
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DeployError(f"another `fedslm supernode` runs with --state {state}") from None


def _write_secret(path: Path) -> None:
    """32 random bytes, readable by this user only (0600 from creation on)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))


def _warn_if(insecure: bool) -> None:
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
