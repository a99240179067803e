"""Parse the command line and dispatch; user errors become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys

USAGE_ERROR = 2
RUN_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedslm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a local federation on Flower's simulation engine")
    sim.add_argument("--config", help="TOML scenario file of key = value pairs")
    sim.add_argument("--rounds", type=int, help="server rounds (num-server-rounds)")
    sim.add_argument("--clients", type=int, help="number of clients (num-clients)")
    sim.add_argument("--local-steps", type=int, help="DP-SGD steps per client and round")
    sim.add_argument("--out", help="folder that receives the run directory (default: runs)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any config key, e.g. --set lora-r=16 (repeatable)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="go on with a stopped run after its last completed round "
                          "(with the run's own config)")
    sim.add_argument("-v", "--verbose", action="store_true", help="log each client's rounds")
    swp = sub.add_parser("sweep", help="run a grid of simulations (a scenario file with a "
                         "[grid] table); writes a CSV, a markdown table and the trade-off plot")
    swp.add_argument("--config", required=True, help="sweep file, e.g. simulations/dp-sweep.toml")
    swp.add_argument("--out", default="runs", help="folder that receives sweep-<time>/")
    aud = sub.add_parser("audit", help="verify privacy ledgers and recompute ε "
                         "(exit 0 ok, 1 problems found, 2 unreadable input)")
    aud.add_argument("path", help="a run directory or a ledger file")
    aud.add_argument("--json", action="store_true", help="print the result as JSON")
    rep = sub.add_parser("report", help="write RUN_DIR/report/index.html with PNG plots "
                         "(several runs: also their trade-off)")
    rep.add_argument("runs", nargs="+", help="run directories; the first receives the report")
    cmp = sub.add_parser("compare", help="a table of runs side by side")
    cmp.add_argument("runs", nargs="+", help="run directories")
    _deploy_parsers(sub)
    bench = sub.add_parser("bench", help="measure the client's training step (plain vs DP, "
                           "per quantization), update sizes and the federation overhead; "
                           "writes BENCHMARKS.md")
    bench.add_argument("--out", default="BENCHMARKS.md", help="markdown report ('' for none)")
    bench.add_argument("--json", help="also write the raw results as JSON")
    bench.add_argument("--steps", type=int, default=6, help="timed steps per case")
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bench.add_argument("--model", default="embedded", help="model source, as for simulate")
    bench.add_argument("--data", default="embedded", help="data source, as for simulate")
    bench.add_argument("--case", action="append", default=[],
                       help="run only this case (repeatable; names as in the table)")
    bench.add_argument("--quick", action="store_true",
                       help="one step per case and a one-round simulation: checks that "
                            "everything runs; the numbers mean nothing")
    return parser


def _deploy_parsers(sub: argparse._SubParsersAction) -> None:
    crt = sub.add_parser("certs", help="create a CA, the SuperLink's TLS certificate and "
                         "SuperNode key pairs")
    crt.add_argument("folder", help="new folder for the certificates and keys")
    crt.add_argument("--address", action="append", default=[],
                     help="host name or IP address the SuperNodes use to reach the SuperLink "
                          "(repeatable; default: 127.0.0.1 and localhost)")
    crt.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    link = sub.add_parser("superlink", help="start Flower's SuperLink with TLS and SuperNode "
                          "authentication")
    link.add_argument("--certs", help="folder made by `fedslm certs`")
    link.add_argument("--address", default="127.0.0.1", help="address to listen on")
    link.add_argument("--port", type=int, default=9092)
    link.add_argument("--state", default="superlink", help="folder for the SuperLink's "
                      "database and the `flwr` connection (default: ./superlink)")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    node = sub.add_parser("supernode", help="start Flower's SuperNode on a device")
    node.add_argument("--ca", help="the federation's CA certificate (ca.crt)")
    node.add_argument("--key", help="this node's private key (nodes/<name>.key)")
    node.add_argument("--superlink", default="127.0.0.1:9092", help="HOST:PORT")
    node.add_argument("--port", type=int, default=9094,
                      help="local port of the node's app runtime (one per node on a machine)")
    node.add_argument("--state", required=True, help="the node's state folder: privacy ledger, "
                      "model cache, Flower's app store")
    node.add_argument("--node-config", default="",
                      help="e.g. \"partition-id=0 device-profile='raspberry-pi-5'\"")
    node.add_argument("--insecure", action="store_true", help="no TLS")


def _deploy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.certs import CertsError, make_certs, node_names
    from deploy.launch import DeployError, start_superlink, start_supernode

    opt = (lambda value: Path(value) if value else None)  # noqa: E731
    try:
        if args.command == "certs":
            addresses = args.address or ["127.0.0.1", "localhost"]
            folder = make_certs(Path(args.folder), addresses, node_names(args.nodes))
            print(f"{folder}: ca.crt, superlink.crt/.key for {', '.join(addresses)}, "
                  f"{args.nodes} node key pairs in nodes/ (keep ca.key offline)")
        elif args.command == "superlink":
            start_superlink(opt(args.certs), args.address, args.port, Path(args.state),
                            args.insecure)
        else:
            start_supernode(opt(args.ca), opt(args.key), args.superlink, args.port,
                            Path(args.state), args.node_config, args.insecure)
    except (CertsError, DeployError) as exc:
        print(f"fedslm: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulations.report import ReportError, compare_table, load_run, write_report

    try:
        if args.command == "compare":
            print(compare_table([load_run(Path(d)) for d in args.runs]))
        else:
            print(write_report([Path(d) for d in args.runs]))
    except ReportError as exc:
        print(f"fedslm: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _audit(args: argparse.Namespace) -> int:
    from privacy.audit import AuditInputError, as_json, audit, render

    try:
        result = audit(args.path)
    except AuditInputError as exc:
        print(f"fedslm: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(as_json(result) if args.json else render(result))
    return 0 if result["ok"] else RUN_FAILED


def _simulate(args: argparse.Namespace) -> int:
    from server.config import ConfigError, load_file, parse_overrides
    from simulations.engine import simulate

    config = load_file(args.config) if args.config else {}
    flags = {"num-server-rounds": args.rounds, "num-clients": args.clients,
             "local-steps": args.local_steps, "out": args.out}
    config.update({k: v for k, v in flags.items() if v is not None})
    config.update(parse_overrides(args.set))
    if args.resume:
        if config:
            raise ConfigError("--resume uses the run's own config: give no other settings")
        config = {"resume": args.resume}
    simulate(config)
    return 0


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedslm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":  # needs no training stack
        return _audit(args)
    if args.command in ("report", "compare"):
        return _report(args)
    if args.command in ("certs", "superlink", "supernode"):
        return _deploy(args)
    _setup_logging(getattr(args, "verbose", False))
    if args.command in ("simulate", "sweep", "bench"):
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            print("fedslm: error: simulation needs Ray: pip install 'fedslm[simulation]'",
                  file=sys.stderr)
            return USAGE_ERROR
        from simulations.loopback import apply_loopback

        apply_loopback()  # before anything imports Ray

    from client.data import DataError
    from client.model import ModelError
    from client.profiles import ProfileError
    from privacy.ledger import LedgerError
    from server.app import FederationError
    from server.config import ConfigError
    from server.records import CheckpointError

    try:
        if args.command == "sweep":
            from pathlib import Path

            from simulations.sweep import sweep

            sweep(Path(args.config), Path(args.out))
            return 0
        if args.command == "bench":
            return _bench(args)
        return _simulate(args)
    except (ConfigError, DataError, ModelError, LedgerError, ProfileError,
            CheckpointError) as exc:
        print(f"fedslm: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except FederationError as exc:
        print(f"fedslm: run failed: {exc}", file=sys.stderr)
        return RUN_FAILED


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulations.bench import BenchConfig, main

    cfg = BenchConfig(model=args.model, data=args.data, steps=args.steps, threads=args.threads,
                      quick=args.quick, cases=args.case)
    command = "fedslm " + " ".join(sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench"])
    return main(cfg, Path(args.out) if args.out else None,
                Path(args.json) if args.json else None, command)


if __name__ == "__main__":
    sys.exit(main())
