"""`fedslm report`: a static HTML page with PNG plots of one or more runs.

Written to <first run>/report/index.html; it needs no network to open. Plots:
held-out loss and perplexity per round, task accuracy per round (with a task), ε per
client against its budget, energy per client and round, bytes per round, and (for
several runs) the privacy-utility-energy trade-off.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from client.shakespeare import CHANCE as SHIPPED_CHANCE
from client.shakespeare import TASK as SHIPPED_TASK
from contracts import rundir
from contracts.errors import FedslmError
from contracts.wire import format_epsilon

PLOT_DPI = 110


class ReportError(FedslmError):
    """A run directory that cannot be reported."""


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's config and rounds; ReportError naming the file when either is unreadable
    or a round lacks a key of the run-directory contract."""
    try:
        config = rundir.read_config(run_dir)
        lines = rundir.read_metrics(run_dir, check=True)
    except rundir.RunDirError as exc:
        raise ReportError(str(exc)) from None
    return {"dir": run_dir, "name": run_dir.name, "config": config, "rounds": lines}


def _num(value: float | None) -> float:
    """A figure to plot: null (kept on the devices, or not finite) is a gap."""
    return math.nan if value is None else value


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison table."""
    first, last = run["rounds"][0], run["rounds"][-1]
    energy = sum(r.get("energy_j") or sum(c["energy_j"] or 0 for c in r["clients"])
                 for r in run["rounds"])  # a device that keeps its energy: null, not counted
    return {
        "run": run["name"],
        "rounds": last["round"],
        "epsilon": last.get("epsilon"),
        "ppl_start": first["perplexity"],
        "ppl_final": last["perplexity"],
        "token_accuracy": last["token_accuracy"],
        "task_start": first.get("task_accuracy"),
        "task_final": last.get("task_accuracy"),
        "energy_kj": energy / 1e3,
        "mb_up": sum(r["bytes_up"] for r in run["rounds"]) / 1e6,
        "mb_down": sum(r["bytes_down"] for r in run["rounds"]) / 1e6,
        "minutes": sum(r["round_seconds"] for r in run["rounds"]) / 60,
        "energy_method": next((c["energy_method"] for r in run["rounds"] for c in r["clients"]
                               if c.get("energy_method")), ""),
    }


def _fmt(key: str, value: Any, digits: int = 2) -> str:
    if key == "epsilon":
        return format_epsilon(value, digits)
    if value is None:
        return "-"  # kept on the devices (release-stats), or never measured
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


COLUMNS = [("run", "run"), ("rounds", "rounds"), ("epsilon", "ε"), ("ppl_start", "ppl round 0"),
           ("ppl_final", "ppl final"), ("token_accuracy", "accuracy"),
           ("task_start", "task acc round 0"), ("task_final", "task acc final"),
           ("energy_kj", "energy kJ"), ("mb_up", "MB up"), ("mb_down", "MB down"),
           ("minutes", "minutes")]


def compare_table(runs: list[dict[str, Any]]) -> str:
    """A markdown table of runs side by side."""
    rows = [summary(r) for r in runs]
    out = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_fmt(key, row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(out)


def _plots(runs: list[dict[str, Any]], folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = runs[0]["rounds"]
    rounds = [r["round"] for r in main]
    made = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=PLOT_DPI)
        plt.close(fig)
        made.append((name, caption))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(rounds, [_num(r["eval_loss"]) for r in main], "o-", color="tab:blue")
    ax.set(xlabel="round", ylabel="held-out loss (nats/token)", xticks=rounds)
    twin = ax.twinx()
    twin.plot(rounds, [_num(r["perplexity"]) for r in main], "s--", color="tab:orange")
    twin.set_ylabel("perplexity", color="tab:orange")
    save(fig, "accuracy.png", "Held-out loss (blue) and perplexity (orange) per round; "
                              "round 0 is the base model.")

    if any(r.get("task_items") or r.get("task_answers") for r in main):
        save(*_task_plot(plt, runs[0]))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    clients = sorted({c["client"] for r in main for c in r["clients"]})
    for name in clients:
        eps = [next((c["epsilon"] for c in r["clients"] if c["client"] == name), None)
               for r in main]
        ax.plot(rounds, [e if e is not None else math.nan for e in eps], "o-", label=name)
    budgets = {c.get("budget_epsilon") for r in main for c in r["clients"]} - {None, 0}
    for budget in budgets:
        ax.axhline(budget, color="red", linestyle=":", label=f"budget ε={budget:g}")
    target = runs[0]["config"].get("target-epsilon")
    if runs[0]["config"].get("dp") and target and target not in budgets:
        ax.axhline(target, color="grey", linestyle="--", label=f"target ε={target:g}")
    central = [r.get("central_epsilon") for r in main]
    if any(central):
        ax.plot(rounds, [c if c is not None else math.nan for c in central], "k^--",
                label="user-level (server)")
    ax.set(xlabel="round", ylabel="cumulative ε", xticks=rounds)
    ax.legend(fontsize=7)
    save(fig, "epsilon.png", f"Cumulative ε per client (δ={main[-1]['delta']:g}); a missing "
                             "point is a client trained without DP (ε = ∞).")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(len(clients), 1)
    for i, name in enumerate(clients):
        joules = [next((c["energy_j"] or 0 for c in r["clients"] if c["client"] == name), 0)
                  for r in main]
        ax.bar([x + i * width for x in rounds], joules, width, label=name)
    method = summary(runs[0])["energy_method"]
    ax.set(xlabel="round", ylabel="energy (J)", xticks=rounds, title=method)
    ax.legend(fontsize=7)
    save(fig, "energy.png", f"Energy per client and round ({method}).")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar([x - 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in main], 0.4, label="up")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in main], 0.4,
           label="down")
    ax.set(xlabel="round", ylabel="MB", xticks=rounds)
    ax.legend()
    save(fig, "bytes.png", "Adapter bytes sent by the clients (up) and to them (down).")

    if len(runs) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        rows = [summary(r) for r in runs]
        top = max(row["energy_kj"] for row in rows) or 1
        finite = [row["epsilon"] for row in rows if row["epsilon"] is not None]
        no_dp = (max(finite) * 1.3 if finite else 1.0)
        for row in rows:
            eps = row["epsilon"] if row["epsilon"] is not None else no_dp
            ax.scatter(eps, row["ppl_final"], s=60 + 400 * row["energy_kj"] / top, alpha=0.6)
            ax.annotate(row["run"], (eps, row["ppl_final"]), fontsize=6)
        ax.set(xlabel="final ε (rightmost: no DP)", ylabel="final perplexity")
        save(fig, "tradeoff.png", "Privacy-utility-energy trade-off: each run at its final ε "
                                  "and perplexity, marker area ∝ energy.")
    return made


def _task_plot(plt, run: dict[str, Any]) -> tuple[Any, str, str]:
    main = run["rounds"]
    rounds = [r["round"] for r in main]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key, style, label in (("task_accuracy", "o-", "accuracy"),
                              ("task_accuracy_norm", "s--", "accuracy, per byte"),
                              ("task_exact_match", "^-", "exact match"),
                              ("task_f1", "v--", "token F1")):
        if any(r.get(key) is not None for r in main):
            ax.plot(rounds, [_num(r.get(key)) for r in main], style, label=label)
    caption = f"Task {run['config'].get('eval-task')}, per round; round 0 is the base model."
    if run["config"].get("eval-task") == SHIPPED_TASK:
        ax.axhline(SHIPPED_CHANCE, color="grey", linestyle=":", label="chance")
        caption += f" Chance: {SHIPPED_CHANCE:.2f} (four plays, balanced)."
    ax.set(xlabel="round", ylabel="task score", xticks=rounds, ylim=(0, 1))
    ax.legend(fontsize=7)
    return fig, "task.png", caption


def write_report(run_dirs: list[Path], folder: Path | None = None,
                 labels: list[str] | None = None) -> Path:
    """The page for these runs in `folder` (default: the first run's report/); `labels`
    name the runs in the table and the trade-off plot (default: their folder names)."""
    runs = [load_run(Path(d)) for d in run_dirs]
    for run, label in zip(runs, labels or [], strict=False):
        run["name"] = label
    folder = folder or runs[0]["dir"] / "report"
    folder.mkdir(parents=True, exist_ok=True)
    images = _plots(runs, folder)
    figures = "\n".join(
        f'<figure><img src="{name}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in images)
    table = compare_table(runs).splitlines()
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table[0].strip("|").split("|"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>"
                                    for c in line.strip("|").split("|")) + "</tr>"
                   for line in table[2:])
    (folder / "index.html").write_text(PAGE.format(
        title=html.escape(runs[0]["name"]), head=head, body=body, figures=figures))
    return folder / "index.html"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedslm run {title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
figure {{ display: inline-block; margin: 0.5em; width: 520px; vertical-align: top; }}
img {{ width: 100%; }} figcaption {{ font-size: 0.85em; color: #555; }}
</style></head>
<body data-images-total="0" data-images-loaded="0">
<h1>fedslm run {title}</h1>
<p>ε: the largest cumulative ε of any client (sample-level DP, replace-one, PLD
accountant), ∞ without DP. Perplexity: exp(held-out next-token loss), pooled over the
clients' held-out data. Energy: summed over clients and rounds; see each plot for how
it was obtained.</p>
<table><tr>{head}</tr>{body}</table>
{figures}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
