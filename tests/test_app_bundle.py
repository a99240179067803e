"""What `flwr run .` ships to every SuperNode (Flower's own FAB builder on this project's
files): the apps' code and pyproject.toml, never state, runs, caches or a user's data,
however often the walk-through is repeated with its state inside the project folder."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files

APP_DIR = Path(__file__).resolve().parents[1]
CODE = ("client/", "server/", "contracts/", "privacy/")
# What a walk-through with its state inside the project left there (the bundle was
# 8.2 MB after one run), and files a user may keep beside the code.
LEFTOVERS = {
    "deploy/device-1/cache/models/SmolLM2-cd23/tokenizer.json": b"{}",
    "deploy/device-1/progress.json": b"{}",
    "deploy/superlink/flwr/config.toml": b"[x]",
    "runs/20261205-101010-ab12/metrics.jsonl": b"{}\n",
    "runs/20261205-101010-ab12/config.json": b"{}",
    "patients.jsonl": b'{"text": "a private record"}\n',
    "notes.md": b"# my notes",
    "scratch/train_my_model.py": b"print('mine')",
}


def _bundle(files: dict[str, bytes | Path]) -> dict[str, bytes]:
    fab, _ = build_fab_from_files(files)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_the_bundle_holds_only_the_apps_code_and_config():
    files = {**collect_files(APP_DIR), **LEFTOVERS}
    shipped = _bundle(files)
    others = {n for n in shipped if not n.startswith(CODE)}
    assert others == {"pyproject.toml", ".info/CONTENT"}
    assert all(n.endswith(".py") for n in shipped if n.startswith(CODE))
    assert {"client/app.py", "server/app.py", "privacy/ledger.py"} <= set(shipped)
    assert not any(n.startswith(("tests/", "docs/", "simulations/")) for n in shipped)


def test_repeating_the_walk_through_does_not_grow_the_bundle():
    """Each run installs the bundle into the nodes' app stores; kept inside the project,
    those copies used to be bundled again, one level deeper each time, until Flower
    refused the third run (AppPathDepthError)."""
    files: dict[str, bytes | Path] = {**collect_files(APP_DIR), **LEFTOVERS}
    sizes = []
    for run in range(4):
        shipped = _bundle(files)
        sizes.append(sum(len(v) for v in shipped.values()))
        for node in ("device-1", "device-2"):  # what each SuperNode installs
            store = f"deploy/{node}/flwr/apps/fedslm.fedslm.0.1.0.{run:08x}"
            files.update({f"{store}/{name}": data for name, data in shipped.items()})
    assert len(set(sizes)) == 1
