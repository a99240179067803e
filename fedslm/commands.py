"""Each command's arguments and runner (the table is in fedslm/cli.py). Runners import
what they need when they run, so that `fedslm audit` needs no training stack."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML scenario file of key = value pairs")
    p.add_argument("--rounds", type=int, help="server rounds (num-server-rounds)")
    p.add_argument("--clients", type=int, help="number of clients (num-clients)")
    p.add_argument("--local-steps", type=int, help="DP-SGD steps per client and round")
    p.add_argument("--out", help="folder that receives the run directory (default: runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set lora-r=16 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="go on with a stopped run after its "
                   "last completed round (with the run's own config)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each client's rounds")


def simulate(args: argparse.Namespace) -> int:
    from contracts.config import parse_overrides
    from simulations.engine import simulate as run

    flags = {"num-server-rounds": args.rounds, "num-clients": args.clients,
             "local-steps": args.local_steps, "out": args.out, "resume": args.resume}
    flags = {k: v for k, v in flags.items() if v is not None}
    run({**flags, **parse_overrides(args.set)}, file=args.config)
    return 0


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sweep file, e.g. simulations/dp-sweep.toml")
    p.add_argument("--out", default="runs", help="folder that receives sweep-<time>/")


def sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import sweep as run

    run(Path(args.config), Path(args.out))
    return 0


def audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run directory or a ledger file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def audit(args: argparse.Namespace) -> int:
    from contracts.errors import FAILED
    from privacy.audit import as_json, render
    from privacy.audit import audit as run

    result = run(args.path)
    print(as_json(result) if args.json else render(result))
    return 0 if result["ok"] else FAILED


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories; the first receives the report")


def report(args: argparse.Namespace) -> int:
    from simulations.report import write_report

    print(write_report([Path(d) for d in args.runs]))
    return 0


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories")


def compare(args: argparse.Namespace) -> int:
    from simulations.report import compare_table, load_run

    print(compare_table([load_run(Path(d)) for d in args.runs]))
    return 0


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory (its adapter on its base model)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, the same answer every time (default); > 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with a "
                   "temperature)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    p.add_argument("--no-chat", action="store_true",
                   help="the prompt as raw text, not a user turn of the chat template")


def generate(args: argparse.Namespace) -> int:
    from client.generate import generate as answer
    from client.generate import load_run_model

    model, tokenizer = load_run_model(Path(args.run))
    answer(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
           chat=not args.no_chat, out=sys.stdout)
    return 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory (its adapter on its base model)")
    p.add_argument("--to", required=True, help="a new (or empty) folder")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "gguf"),
                   help="a Hugging Face folder, or a GGUF file for llama.cpp")
    p.add_argument("--quant", default="q8_0", choices=("f16", "q8_0", "q4_0"),
                   help="GGUF weight type (1-D tensors stay f32)")


def export(args: argparse.Namespace) -> int:
    from client.export import export as write

    print(write(Path(args.run), Path(args.to), args.format, args.quant))
    return 0


def certs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="new folder for the certificates and keys")
    p.add_argument("--address", action="append", default=[],
                   help="host name or IP address the SuperNodes use to reach the SuperLink "
                        "(repeatable; default: 127.0.0.1 and localhost)")
    p.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")


def certs(args: argparse.Namespace) -> int:
    from deploy.certs import make_certs, node_names

    addresses = args.address or ["127.0.0.1", "localhost"]
    folder = make_certs(Path(args.folder), addresses, node_names(args.nodes))
    print(f"{folder}: ca.crt, superlink.crt/.key for {', '.join(addresses)}, "
          f"{args.nodes} node key pairs in nodes/ (keep ca.key offline)")
    return 0


def superlink_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", help="folder made by `fedslm certs`")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--state", default="superlink", help="folder for the SuperLink's database "
                   "and the `flwr` connection (default: ./superlink)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")


def superlink(args: argparse.Namespace) -> int:
    from deploy.launch import start_superlink

    start_superlink(_path(args.certs), args.address, args.port, Path(args.state), args.insecure)
    return 0


def supernode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", help="the federation's CA certificate (ca.crt)")
    p.add_argument("--key", help="this node's private key (nodes/<name>.key)")
    p.add_argument("--superlink", default="127.0.0.1:9092", help="HOST:PORT")
    p.add_argument("--port", type=int, default=9094,
                   help="local port of the node's app runtime (one per node on a machine)")
    p.add_argument("--state", required=True, help="the node's state folder: privacy ledger, "
                   "model cache, Flower's app store")
    p.add_argument("--policy", help="the device owner's policy file (TOML): DP, lifetime "
                   "budget, data, models, caps (docs/deployment.md)")
    p.add_argument("--node-config", default="",
                   help="the node's own settings, e.g. \"device-profile='raspberry-pi-5' "
                   "threads=2\"")
    p.add_argument("--insecure", action="store_true", help="no TLS")
    p.add_argument("--no-worker", action="store_true", help=argparse.SUPPRESS)


def supernode(args: argparse.Namespace) -> int:
    from client.policy import checked_node_config, load_policy
    from deploy.launch import NO_WORKER, DeployError, parse_node_config, start_supernode

    if args.no_worker:
        raise DeployError(NO_WORKER)
    if not args.policy:
        raise DeployError("give --policy: the device's own privacy policy, with its lifetime "
                          "budget (docs/deployment.md, Writing a device policy)")
    load_policy(args.policy)  # a bad policy: one line naming the file and key, exit 2
    node = checked_node_config(parse_node_config(args.node_config))
    return start_supernode(_path(args.ca), _path(args.key), args.superlink, args.port,
                           Path(args.state), node, args.insecure, Path(args.policy))


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="markdown report (default: "
                   "benchmarks/<cpu class>.md, e.g. benchmarks/avx2.md; '' for none)")
    p.add_argument("--json", help="also write the raw results as JSON")
    p.add_argument("--steps", type=int, default=6, help="timed steps per case")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default="embedded", help="model source, as for simulate")
    p.add_argument("--data", default="embedded", help="data source, as for simulate")
    p.add_argument("--case", action="append", default=[],
                   help="run only this case (repeatable; names as in the table)")
    p.add_argument("--quick", action="store_true", help="one step per case and a one-round "
                   "simulation: checks that everything runs; the numbers mean nothing")
    p.add_argument("--emulate-no-bf16", action="store_true", help="run as a CPU without bf16 "
                   "(oneDNN capped at AVX2, ATen at avx2, the client picks fp32): measures "
                   "the edge path on a bf16 machine")


def bench(args: argparse.Namespace) -> int:
    from simulations.bench import BenchConfig, main

    cfg = BenchConfig(model=args.model, data=args.data, steps=args.steps, threads=args.threads,
                      quick=args.quick, cases=args.case, emulate_no_bf16=args.emulate_no_bf16)
    command = "fedslm " + " ".join(sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench"])
    out = None if args.out == "" else (Path(args.out) if args.out else "by-class")
    return main(cfg, out, _path(args.json), command)
