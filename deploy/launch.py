"""`fedslm superlink` and `fedslm supernode`: Flower's own deployment processes, started
with TLS, SuperNode authentication and the settings that keep their traffic on the
addresses given (no telemetry, no update check, no hub, no runtime `uv sync`).

Each command replaces itself with Flower's process (`flower-superlink`,
`flower-supernode`), so signals and exit codes are Flower's.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path

from contracts import environment
from contracts.config import ConfigError, validate_node
from contracts.errors import FedslmError
from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY

log = logging.getLogger("fedslm")
CONNECTION = "fedslm"
INSECURE_WARNING = ("fedslm: WARNING: --insecure: TLS is OFF. Adapters, metrics and node "
                    "credentials cross the network in the clear. Use it only on a closed test "
                    "network.")


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
                      state: Path, node_config: str, insecure: bool) -> list[str]:
    """The node's state folder holds its ledger, its model cache and Flower's app store."""
    check_address(superlink)
    check_port(port, "--port")
    parse_node_config(node_config)
    settings = f"state-dir={_toml(state)} cache-dir={_toml(state / 'cache')}"
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
                    node_config: str, insecure: bool) -> None:
    command = supernode_command(ca, key, superlink, port, state, node_config, insecure)
    _warn_if(insecure)
    state.mkdir(parents=True, exist_ok=True)
    run(command, state / "flwr")


def _warn_if(insecure: bool) -> None:
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
