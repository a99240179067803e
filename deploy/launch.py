"""`fedslm superlink` and `fedslm supernode`: Flower's own deployment processes, started
with TLS, SuperNode authentication and the settings that keep their traffic on the
addresses given (no telemetry, no update check, no hub, no runtime `uv sync`).

Each command replaces itself with Flower's process (`flower-superlink`,
`flower-supernode`), so signals and exit codes are Flower's.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY

log = logging.getLogger("fedslm")
CONNECTION = "fedslm"
INSECURE_WARNING = ("fedslm: WARNING: --insecure: TLS is OFF. Adapters, metrics and node "
                    "credentials cross the network in the clear. Use it only on a closed test "
                    "network.")


class DeployError(ValueError):
    """A missing certificate or key, or an unusable option."""


def quiet_environ(flwr_home: Path) -> dict[str, str]:
    """The environment of a SuperLink or SuperNode (and of the apps they start)."""
    bin_dir = str(Path(sys.executable).parent)  # Flower starts flower-superexec from PATH
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    }


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


def supernode_command(ca: Path | None, key: Path | None, superlink: str, port: int,
                      state: Path, node_config: str, insecure: bool) -> list[str]:
    """The node's state folder holds its ledger, its model cache and Flower's app store."""
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
    env = quiet_environ(flwr_home)
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
