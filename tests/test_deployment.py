"""The deployment path on real processes: `fedslm certs`, a SuperLink with TLS and
SuperNode authentication, registered SuperNodes, `flwr run`, a node killed mid-round and
restarted. Everything listens on 127.0.0.1 and is stopped by the fixtures."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from contracts.rundir import read_metrics, run_dirs
from privacy.ledger import Ledger
from tests.test_simulation import CLIENT_KEYS, RUN_KEYS

pytestmark = pytest.mark.slow
APP_DIR = Path(__file__).resolve().parents[1]
FEDSLM = [sys.executable, "-m", "fedslm.cli"]
FLWR = str(Path(sys.executable).parent / "flwr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink and SuperNodes started with `fedslm superlink` / `fedslm supernode`."""

    def __init__(self, root: Path, model: Path, data: Path) -> None:
        self.root, self.model, self.data = root, model, data
        self.certs = root / "certs"
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(root / "superlink" / "flwr"),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([*FEDSLM, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def policy(self, name: str, partition: int) -> Path:
        """The device owner's policy: its data, the test model, a lifetime budget."""
        path = self.root / f"{name}-policy.toml"
        path.write_text(f"budget-epsilon = 200.0\nmax-epsilon-per-run = 10.0\n"
                        f"data = {json.dumps(str(self.data))}\npartition-id = {partition}\n"
                        f"models = [{json.dumps(str(self.model))}]\nseq-len = 32\n")
        return path

    def start_node(self, name: str, partition: int) -> subprocess.Popen:
        return self.start(name, [
            "supernode", "--ca", str(self.certs / "ca.crt"),
            "--key", str(self.certs / "nodes" / f"{name}.key"),
            "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port()),
            "--state", str(self.state(name)), "--policy", str(self.policy(name, partition)),
            "--node-config", "threads=1"])

    def state(self, name: str) -> Path:
        return self.root / "devices" / name

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([FLWR, *args], capture_output=True, text=True, env=self.env,
                              cwd=self.root, timeout=timeout)

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "list", "fedslm", "--format", "json")
        nodes = json.loads(out.stdout).get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() != count:
            assert time.monotonic() < deadline, f"not {count} nodes online"
            time.sleep(1)

    def run_args(self, out: Path, **config: object) -> list[str]:
        settings = {"num-clients": 2, "num-server-rounds": 2, "model": str(self.model),
                    "data": str(self.data), "seq-len": 32, "batch-size": 4, "local-steps": 2,
                    "lora-r": 4, "max-eval-seqs": 4, "out": str(out),
                    # the devices serve many runs: each run's own ε is held to the
                    # policy's max-epsilon-per-run (10) by the devices, not by this target
                    "target-epsilon": 150.0, **config}
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
        return ["run", str(APP_DIR), "fedslm", "--stream", "--run-config", run_config]

    def last_status(self) -> str:
        runs = json.loads(self.flwr("ls", "fedslm", "--format", "json").stdout)["runs"]
        return sorted(runs, key=lambda r: r["pending-at"])[-1]["status"]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model):
    from tests.conftest import make_text_clients

    root = tmp_path_factory.mktemp("deploy")
    dep = Deployment(root, tiny_model, make_text_clients(root / "data"))
    try:
        _start(dep)
    except BaseException:  # a failed start leaves nothing running either
        dep.stop()
        raise
    yield dep
    dep.stop()


def _start(dep: Deployment) -> None:
    root = dep.root
    made = subprocess.run([*FEDSLM, "certs", str(dep.certs), "--nodes", "3"],
                          capture_output=True, text=True, env=dep.env)
    assert made.returncode == 0, made.stderr
    dep.start("superlink", ["superlink", "--certs", str(dep.certs), "--port", str(dep.port),
                            "--state", str(root / "superlink")])
    deadline = time.monotonic() + 60
    while dep.flwr("supernode", "list", "fedslm").returncode != 0:
        assert time.monotonic() < deadline, dep.log("superlink")
        time.sleep(1)
    for name in ("node-1", "node-2"):  # node-3 stays unregistered
        reg = dep.flwr("supernode", "register", str(dep.certs / "nodes" / f"{name}.pub"),
                       "fedslm")
        assert reg.returncode == 0, reg.stdout + reg.stderr
    dep.start_node("node-1", 0)
    dep.start_node("node-2", 1)
    dep.wait_online(2)


def _listening(pids: list[int]) -> set[str]:
    found = set()
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            for p in procs:
                found |= {c.laddr.ip for c in p.net_connections("inet") if c.status == "LISTEN"}
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_state_folder_serves_one_node(deployment):
    """A second `fedslm supernode` on a running node's state folder (its ledger, its
    SuperExec secret) is refused before it starts anything."""
    args = ["supernode", "--ca", str(deployment.certs / "ca.crt"),
            "--key", str(deployment.certs / "nodes" / "node-1.key"),
            "--superlink", f"127.0.0.1:{deployment.port}", "--port", str(_free_port()),
            "--state", str(deployment.state("node-1")),
            "--policy", str(deployment.policy("node-1", 0))]
    second = subprocess.run([*FEDSLM, *args], capture_output=True, text=True,
                            env=deployment.env, timeout=60)
    assert second.returncode == 2
    assert "another `fedslm supernode` runs with --state" in second.stderr
    assert (deployment.state("node-1") / "superexec.secret").is_file()  # the first's, kept


def test_unregistered_supernode_is_refused(deployment):
    proc = deployment.start_node("node-3", 2)
    assert proc.wait(timeout=60) != 0
    del deployment.procs["node-3"]
    assert "Failed to activate SuperNode" in deployment.log("node-3")
    assert deployment.online_nodes() == 2
    assert _listening([p.pid for p in deployment.procs.values()]) == {"127.0.0.1"}


def _ledger(deployment: Deployment, name: str) -> list:
    with Ledger(deployment.state(name) / "ledger.sqlite", create=False) as ledger:
        assert ledger.verify() == []
        return ledger.entries()


def test_tls_authenticated_federation_runs_two_rounds(deployment, tmp_path):
    out = deployment.flwr(*deployment.run_args(tmp_path / "runs"), timeout=400)
    assert deployment.last_status() == "finished:completed", out.stdout[-3000:]
    run_dir = run_dirs(tmp_path / "runs")[-1]
    lines = read_metrics(run_dir)
    assert [x["round"] for x in lines] == [0, 1, 2]
    for line in lines:
        assert RUN_KEYS <= set(line) and line["failures"] == []
        assert {c["client"] for c in line["clients"]} == {"node-1", "node-2"}  # owners' names
        assert all(CLIENT_KEYS <= set(c) for c in line["clients"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # a device's default: its timings, energy and held-out sums stay on it
    assert all(line["eval_loss"] is None for line in lines)
    assert all(c["train_seconds"] is None and c["energy_j"] is None and
               not c["stats_released"] for line in lines for c in line["clients"])
    assert "held-out metrics kept on the devices" in out.stdout + out.stderr
    for name in ("node-1", "node-2"):
        assert stat.S_IMODE(deployment.state(name).stat().st_mode) == 0o700
        assert stat.S_IMODE((deployment.state(name) / "ledger.sqlite").stat().st_mode) == 0o600
        assert "held-out loss" in deployment.log(name)  # ...in the device's own log
        entries = [e for e in _ledger(deployment, name) if e.run_id == run_dir.name]
        assert [e.round for e in entries] == [1, 2]
        audit = subprocess.run([*FEDSLM, "audit", str(deployment.state(name) / "ledger.sqlite")],
                               capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout
        assert ": step 2/2, " in deployment.log(name)  # the device logs its round's progress


def test_a_killed_supernode_does_not_stop_the_run(deployment, tmp_path):
    out = tmp_path / "runs"
    run = subprocess.Popen([FLWR, *deployment.run_args(out, **{"round-timeout": 90.0})],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=deployment.env, cwd=deployment.root)
    ledger = deployment.state("node-2") / "ledger.sqlite"
    before = len(_ledger(deployment, "node-2"))
    deadline = time.monotonic() + 180
    while len(_ledger(deployment, "node-2")) == before:  # round 1's spend is recorded...
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.2)
    node_processes = _descendants(deployment, "node-2")
    deployment.kill("node-2")  # ...and the device dies while it trains
    _, alive = psutil.wait_procs(node_processes, timeout=15)
    assert not alive  # its worker and flower-supernode died with `fedslm supernode`
    output, _ = run.communicate(timeout=400)
    assert deployment.last_status() == "finished:completed", output[-3000:]

    run_dir = run_dirs(out)[-1]
    lines = read_metrics(run_dir)
    assert [x["round"] for x in lines] == [0, 1, 2]
    assert lines[1]["failures"]
    assert [c["client"] for c in lines[1]["clients"] if c["status"] == "trained"] == \
        ["node-1"]
    assert [c["client"] for c in lines[2]["clients"]] == ["node-1"]
    charged = [e for e in _ledger(deployment, "node-2") if e.run_id == run_dir.name]
    assert [e.round for e in charged] == [1]  # its spend survived the crash

    deployment.start_node("node-2", 1)  # restarted with the same state folder
    deployment.wait_online(2)
    again = deployment.flwr(*deployment.run_args(out, **{"num-server-rounds": 1}), timeout=400)
    assert deployment.last_status() == "finished:completed", again.stdout[-3000:]
    entries = _ledger(deployment, "node-2")
    assert len(entries) == before + 2
    assert entries[-1].epsilon > entries[-2].epsilon  # cumulative over all its runs
    audit = subprocess.run([*FEDSLM, "audit", str(ledger)], capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout


LOADED = "fedslm: model loaded (load #"
SERVED = re.compile(r"fedslm: (train|evaluate) task #\d+: ok")


def _descendants(deployment: Deployment, name: str) -> list[psutil.Process]:
    return psutil.Process(deployment.procs[name].pid).children(recursive=True)


def _worker(deployment: Deployment, name: str) -> psutil.Process:
    return next(p for p in _descendants(deployment, name)
                if "client.worker" in p.cmdline())


def test_a_node_loads_its_model_once_per_run(deployment, tmp_path):
    """The node's worker keeps the model between a run's messages and loads it again only
    for a run that changes it; stopping `fedslm supernode` stops everything it started."""
    names = ("node-1", "node-2")
    workers = {name: _worker(deployment, name).pid for name in names}
    assert all(stat.S_IMODE((deployment.state(n) / f).stat().st_mode) == 0o600
               for n in names for f in ("superexec.secret", "device.sqlite"))
    offsets = {name: len(deployment.log(name)) for name in names}
    out = deployment.flwr(*deployment.run_args(tmp_path / "a", **{"lora-r": 3}), timeout=400)
    assert deployment.last_status() == "finished:completed", out.stdout[-3000:]
    assert [x["round"] for x in read_metrics(run_dirs(tmp_path / "a")[-1])] == [0, 1, 2]
    for name in names:
        run_log = deployment.log(name)[offsets[name]:]
        assert run_log.count(LOADED) == 1, run_log  # once for the whole run...
        assert len(SERVED.findall(run_log)) >= 5, run_log  # ...of 5 messages
        assert "Traceback" not in run_log
        offsets[name] += len(run_log)

    again = deployment.flwr(*deployment.run_args(tmp_path / "b", **{
        "lora-r": 3, "lora-targets": "q_proj,k_proj,v_proj", "num-server-rounds": 1}),
        timeout=400)
    assert deployment.last_status() == "finished:completed", again.stdout[-3000:]
    for name in names:
        run_log = deployment.log(name)[offsets[name]:]
        assert run_log.count(LOADED) == 1, run_log  # another model: loaded again, once
        assert len(SERVED.findall(run_log)) >= 3, run_log
        assert _worker(deployment, name).pid == workers[name]  # the same worker throughout

    processes = _descendants(deployment, "node-1")
    deployment.kill("node-1", signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive and not psutil.pid_exists(workers["node-1"])
    assert not (deployment.state("node-1") / "superexec.secret").exists()
    deployment.start_node("node-1", 0)  # the fixture as it was
    deployment.wait_online(2)


def test_insecure_is_loud_and_tls_needs_certificates(tmp_path):
    missing = subprocess.run([*FEDSLM, "superlink", "--state", str(tmp_path / "s")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "give --certs" in missing.stderr
    node = subprocess.run([*FEDSLM, "supernode", "--state", str(tmp_path / "n")],
                          capture_output=True, text=True)
    assert node.returncode == 2 and "give --policy" in node.stderr
    policy = tmp_path / "policy.toml"
    policy.write_text("budget-epsilon = 8.0\n")
    node = subprocess.run([*FEDSLM, "supernode", "--state", str(tmp_path / "n"),
                           "--policy", str(policy)], capture_output=True, text=True)
    assert node.returncode == 2 and "give --ca" in node.stderr
    for args, expected in [(["--policy", str(tmp_path / "none.toml")], "policy file not found"),
                           (["--policy", str(policy), "--node-config", "data='x.jsonl'"],
                            "node config key 'data' is the device policy's"),
                           (["--policy", str(policy), "--no-worker"], "--no-worker is gone")]:
        node = subprocess.run([*FEDSLM, "supernode", "--state", str(tmp_path / "n"), *args],
                              capture_output=True, text=True)
        assert node.returncode == 2 and expected in node.stderr, node.stderr
        assert len(node.stderr.strip().splitlines()) == 1
    proc = subprocess.Popen([*FEDSLM, "superlink", "--insecure", "--port", str(_free_port()),
                             "--state", str(tmp_path / "s")], stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert "WARNING: --insecure: TLS is OFF" in proc.stderr.readline()  # the first line
        assert "connection 'fedslm'" in proc.stderr.readline()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    config = (tmp_path / "s" / "flwr" / "config.toml").read_text()
    assert "insecure = true" in config


def test_certs_cover_the_addresses_and_refuse_to_overwrite(tmp_path):
    from cryptography import x509

    folder = tmp_path / "certs"
    made = subprocess.run([*FEDSLM, "certs", str(folder), "--address", "10.0.0.5",
                           "--address", "coordinator.lan", "--nodes", "2"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    cert = x509.load_pem_x509_certificate((folder / "superlink.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.lan"]
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert sorted(p.name for p in (folder / "nodes").iterdir()) == \
        ["node-1.key", "node-1.pub", "node-2.key", "node-2.pub"]
    assert (folder / "nodes" / "node-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct((folder / "ca.key").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([*FEDSLM, "certs", str(folder)], capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    bad = subprocess.run([*FEDSLM, "certs", str(tmp_path / "x"), "--address", "a b"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and not (tmp_path / "x").exists()


def test_a_deleted_device_ledger_is_flagged_by_the_server(deployment, tmp_path):
    """The server remembers each client's spend across runs (<out>/.privacy-spend.json):
    a device whose ledger disappears between runs comes back at ε = 0 and is flagged."""
    out = tmp_path / "runs"
    first = deployment.flwr(*deployment.run_args(out, **{"num-server-rounds": 1}),
                            timeout=400)
    assert deployment.last_status() == "finished:completed", first.stdout[-3000:]
    for path in deployment.state("node-1").glob("ledger.sqlite*"):
        path.unlink()  # the data owner (or a bug) deletes the ledger
    again = deployment.flwr(*deployment.run_args(out, **{"num-server-rounds": 1}),
                            timeout=400)
    assert deployment.last_status() == "finished:completed", again.stdout[-3000:]
    run_dir = run_dirs(out)[-1]
    flags = read_metrics(run_dir)[0]["privacy_flags"]
    assert [f["client"] for f in flags] == ["node-1"]
    assert flags[0]["problem"].startswith("no privacy ledger while this server saw ε=")
    audit = subprocess.run([*FEDSLM, "audit", str(run_dir)], capture_output=True, text=True)
    assert audit.returncode == 1
    assert "round 0: the server flagged node-1: no privacy ledger" in audit.stdout
    assert "the clients' ledgers are on their devices" in audit.stdout


def test_a_hostile_run_config_is_refused_with_a_code(deployment, tmp_path):
    """`dp=false` and a data file the owners never named: both devices refuse the run from
    its first message, the server hears `refused-by-policy` and nothing else, the reasons
    are in the devices' logs and records."""
    secret = tmp_path / "not-the-owners.jsonl"
    secret.write_text('{"text": "a file the coordinator chose"}\n' * 40)
    offsets = {n: len(deployment.log(n)) for n in ("node-1", "node-2")}
    run = deployment.flwr(*deployment.run_args(tmp_path / "runs", **{
        "dp": False, "data": str(secret), "num-server-rounds": 1}), timeout=400)
    assert deployment.last_status() == "finished:failed"
    server_saw = run.stdout + run.stderr
    reasons = re.findall(r"round 0 evaluate: node \d+ failed: (.*)", server_saw)
    assert reasons == ["refused-by-policy"] * 2, server_saw[-3000:]
    assert str(deployment.root / "devices") not in server_saw and "dp=false:" not in server_saw
    for name in offsets:
        log = deployment.log(name)[offsets[name]:]
        assert "dp=false: this device trains only under DP" in log
        audit = subprocess.run([*FEDSLM, "audit", str(deployment.state(name))],
                               capture_output=True, text=True)
        assert "refused-by-policy: dp=false" in audit.stdout, audit.stdout
        assert "policy since" in audit.stdout and "budget-epsilon=200.0" in audit.stdout


def test_a_hostile_app_bundle_never_runs_on_a_device(deployment, tmp_path):
    """A copy of the app whose ClientApp reads the device's data, ledger and secret and
    replies with their bytes: the devices serve the run with their own installed app."""
    import shutil

    bundle = tmp_path / "hostile-app"
    shutil.copytree(APP_DIR, bundle, ignore=shutil.ignore_patterns(
        ".venv", ".git", "tests", "runs", "docs", "benchmarks", "__pycache__", "*.egg-info"))
    mark = tmp_path / "the-bundle-ran"
    (bundle / "client" / "app.py").write_text(HOSTILE_APP.replace("MARK", repr(str(mark))))
    out = tmp_path / "runs"
    run = deployment.flwr("run", str(bundle), "fedslm", "--stream", "--run-config",
                          deployment.run_args(out, **{"num-server-rounds": 1})[-1],
                          timeout=400)
    assert deployment.last_status() == "finished:completed", run.stdout[-3000:]
    assert not mark.exists()  # the bundle's code was never imported on a device
    lines = read_metrics(run_dirs(out)[-1])
    trained = [c for c in lines[1]["clients"] if c["status"] == "trained"]
    assert {c["client"] for c in trained} == {"node-1", "node-2"}
    assert all(c["noise_multiplier"] > 0 for c in trained)  # DP-trained by the device's code
    for name in ("node-1", "node-2"):
        assert "is not run here" in deployment.log(name)


HOSTILE_APP = """
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path(MARK).write_text("imported")
app = ClientApp()


def _loot(context):
    state = Path(str(context.node_config.get("state-dir", ".")))
    found = {}
    for name in ("ledger.sqlite", "superexec.secret", "device.sqlite"):
        try:
            found[name] = (state / name).read_bytes().hex()[:2000]
        except OSError as exc:
            found[name] = str(exc)
    return found


@app.train()
def train(msg, context):
    Path(MARK).write_text("trained")
    return Message(RecordDict({"info": ConfigRecord(_loot(context))}), reply_to=msg)


@app.evaluate()
def evaluate(msg, context):
    Path(MARK).write_text("evaluated")
    return Message(RecordDict({"info": ConfigRecord(_loot(context))}), reply_to=msg)
"""
