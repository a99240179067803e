"""`fedslm report` and `fedslm compare`; the page opened in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedslm.cli import main


def fake_run(folder: Path, dp: bool = True, rounds: int = 3) -> Path:
    """A run directory with the contract's keys (values shaped like a real run's)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"run-id": folder.name, "dp": dp}))
    lines = []
    for r in range(rounds + 1):
        eps = (2.0 * r if dp else float("nan")) if r else 0.0
        clients = [{"client": f"c{i}", "status": "trained" if r else "evaluated",
                    "epsilon": None if eps != eps else eps + i / 10, "budget_epsilon": 10.0,
                    "num_examples": 100, "train_seconds": 3.0 * bool(r),
                    "energy_j": 20.0 + r, "energy_method": "estimated:cpu-time@7.5W/core",
                    "peak_rss_mb": 900.0, "bytes_up": 1000 * bool(r), "steps": 10 * bool(r)}
                   for i in range(2)]
        lines.append({"round": r, "eval_loss": 4.5 - 0.1 * r, "perplexity": 90.0 - 5 * r,
                      "token_accuracy": 0.2 + 0.01 * r, "epsilon": None if eps != eps else eps,
                      "delta": 1e-5, "central_epsilon": None, "round_seconds": 10.0,
                      "bytes_up": 2000 * bool(r), "bytes_down": 4000 * bool(r),
                      "energy_j": 41.0 + 2 * r, "clients": clients})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def test_compare_prints_one_row_per_run(tmp_path, capsys):
    a, b = fake_run(tmp_path / "run-a"), fake_run(tmp_path / "run-b", dp=False)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | rounds | ε | ppl round 0 | ppl final |")
    assert out[2].startswith("| run-a | 3 | 6.00 | 90.00 | 75.00 |")
    assert out[3].startswith("| run-b | 3 | ∞ |")
    assert main(["compare", str(tmp_path / "nope")]) == 2


def test_a_deployment_whose_devices_keep_their_stats_reports_and_compares(tmp_path, capsys):
    """release-stats=false on every device: no held-out metrics, no energy, no seconds."""
    run = fake_run(tmp_path / "private")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.update(eval_loss=None, perplexity=None, token_accuracy=None, energy_j=None)
        for c in line["clients"]:
            c.update(train_seconds=None, energy_j=None, peak_rss_mb=None)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "accuracy.png").is_file()
    assert main(["compare", str(run)]) == 0
    assert "| private | 3 | 6.00 | - | - | - | - | - | 0.00 |" in capsys.readouterr().out


def test_a_run_with_a_task_plots_and_compares_its_accuracy(tmp_path, capsys):
    run = fake_run(tmp_path / "task")
    (run / "config.json").write_text(json.dumps({"run-id": "task", "dp": True,
                                                 "eval-task": "plays"}))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.update(task_items=160, task_accuracy=0.25 + 0.05 * line["round"],
                    task_accuracy_norm=0.3)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["compare", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "task acc round 0 | task acc final" in out[0]
    assert "| 0.25 | 0.40 |" in out[2]
    assert main(["report", str(run)]) == 0
    page = Path(capsys.readouterr().out.strip()).read_text()
    assert '<img src="task.png"' in page and "Chance: 0.25" in page
    assert (run / "report" / "task.png").stat().st_size > 5000


def test_report_writes_a_page_whose_images_all_load_in_chromium(tmp_path, capsys):
    a, b = fake_run(tmp_path / "run-a"), fake_run(tmp_path / "run-b", dp=False)
    assert main(["report", str(a), str(b)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == a / "report" / "index.html"
    images = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert images == ["accuracy.png", "epsilon.png", "energy.png", "bytes.png", "tradeoff.png"]
    assert all((page.parent / name).stat().st_size > 5000 for name in images)
    assert "http" not in page.read_text()  # opens without a network

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        assert os.environ.get("CI") != "true", ".ci/run must install chromium"
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", f"--user-data-dir={tmp_path / 'chromium'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-total="5"' in dom, dom[:500]
    assert 'data-images-loaded="5"' in dom
