"""The command line: a table of commands, each with its arguments and its runner.

Every error a user can cause is a `contracts.errors.FedslmError`: it becomes one line on
stderr and the error's exit code (2: bad input, nothing ran; 1: the run failed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from contracts.errors import FAILED, USAGE, FedslmError
from fedslm import commands


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    simulation: bool = False  # starts Ray: needs its extra and the loopback settings first


COMMANDS = (
    Command("simulate", "run a local federation on Flower's simulation engine",
            commands.simulate_arguments, commands.simulate, simulation=True),
    Command("sweep", "run a grid of simulations (a scenario file with a [grid] table); writes "
            "a CSV, a markdown table and the trade-off plot", commands.sweep_arguments,
            commands.sweep, simulation=True),
    Command("audit", "verify privacy ledgers and recompute ε (exit 0 ok, 1 problems found, "
            "2 unreadable input)", commands.audit_arguments, commands.audit),
    Command("report", "write RUN_DIR/report/index.html with PNG plots (several runs: also "
            "their trade-off)", commands.report_arguments, commands.report),
    Command("compare", "a table of runs side by side", commands.compare_arguments,
            commands.compare),
    Command("generate", "answer a prompt with a run's adapter on its base model (streamed; "
            "greedy unless --temperature)", commands.generate_arguments, commands.generate),
    Command("export", "merge a run's adapter into its base: a Hugging Face folder or a GGUF "
            "file (f16, q8_0, q4_0)", commands.export_arguments, commands.export),
    Command("certs", "create a CA, the SuperLink's TLS certificate and SuperNode key pairs",
            commands.certs_arguments, commands.certs),
    Command("superlink", "start Flower's SuperLink with TLS and SuperNode authentication",
            commands.superlink_arguments, commands.superlink),
    Command("supernode", "start Flower's SuperNode on a device", commands.supernode_arguments,
            commands.supernode),
    Command("bench", "measure the client's training step (plain vs DP, per quantization), "
            "update sizes and the federation overhead; writes BENCHMARKS.md",
            commands.bench_arguments, commands.bench, simulation=True),
)
BY_NAME = {c.name: c for c in COMMANDS}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedslm", description="Federated DP-LoRA fine-tuning "
                                  "of small language models (Flower + Opacus).")
    sub = top.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.arguments(sub.add_parser(command.name, help=command.help,
                                         description=command.help))
    return top


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedslm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def _prepare_simulation() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise FedslmError("simulation needs Ray: pip install 'fedslm[simulation]'")
    from contracts.environment import apply_loopback

    apply_loopback()  # before anything imports Ray


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = BY_NAME[args.command]
    try:
        if command.simulation:
            _setup_logging(getattr(args, "verbose", False))
            _prepare_simulation()
        return command.run(args)
    except FedslmError as exc:
        kind = "run failed" if exc.exit_code == FAILED else "error"
        print(f"fedslm: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code


__all__ = ["COMMANDS", "USAGE", "main"]

if __name__ == "__main__":
    sys.exit(main())
