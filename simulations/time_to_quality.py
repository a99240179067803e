"""Time to quality: a client's training wall time to reach a held-out perplexity under DP
at the same ε, fedslm's recipe against the textbook Opacus + PEFT path, side by side.

The paths train one client of the embedded data (its own train / held-out split, as the
client makes it) from the same base and seed, each with σ from the RDP accountant for its
own (q, steps) at the same target ε and δ, and are evaluated on the same held-out
sequences every `eval_every` steps. They run in one process, taking turns a segment of
`eval_every` steps at a time, so that the machine's drift falls on all of them. Only
training is timed; evaluation is not.

- **textbook**: what the Opacus and PEFT docs lead to: an fp32 base, LoRA on q_proj and
  v_proj of every layer, `opacus.PrivacyEngine.make_private` with Poisson sampling, the
  Hugging Face loss (`model(..., labels=...).loss`, full logits), AdamW; once with each
  drawn batch in one forward, once split into the micro-batches of the fp32 client by
  Opacus' `BatchMemoryManager` (what that path needs to stay in the client's memory on a
  CPU without bf16).
- **fedslm**: the client's own path with the demo's recipe (simulations/default.toml):
  the `auto` base, its LoRA targets and layers, chunked loss, micro-batches, its steps and
  learning rate (client/trainer.py).

The quality bar is fedslm's final held-out perplexity (or `target_ppl`); each path's time
to quality is its training time up to the first evaluation at or below the bar.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TOML = Path(__file__).with_name("default.toml")


@dataclass
class Recipe:
    name: str
    targets: list[str]
    layers: int  # 0 = every layer
    lr: float
    steps: int
    batch: int
    textbook: bool  # Opacus' PrivacyEngine + the HF loss on an fp32 base
    physical_batch: int = 0  # sequences per forward/backward (0: the whole draw)


@dataclass
class Curve:
    recipe: Recipe
    sigma: float
    points: list[tuple[int, float, float]] = field(default_factory=list)  # step, s, ppl

    def time_to(self, ppl: float) -> float | None:
        """Training seconds up to the first evaluation after training at or below `ppl`."""
        return next((s for step, s, p in self.points if step > 0 and p <= ppl), None)


def recipes(steps_textbook: int = 30, steps: int = 0, physical_batch: int = 1,
            textbook_physical_batch: int = 1) -> tuple[Recipe, Recipe, Recipe]:
    """(textbook, textbook in micro-batches, fedslm): fedslm's from the demo's scenario
    (`steps` > 0 overrides its steps) with `physical_batch` sequences per forward; the
    textbook one with the previous demo's settings (q_proj,v_proj, 10 steps x 3 rounds,
    lr 0.01), once with whole batches and once `textbook_physical_batch` sequences at a
    time, as Opacus' BatchMemoryManager does it."""
    demo = tomllib.loads(DEFAULT_TOML.read_text())
    steps = steps or demo["local-steps"] * demo["num-server-rounds"]
    ours = Recipe("fedslm (demo recipe)", demo["lora-targets"].split(","),
                  demo.get("lora-layers", 0), demo["lr"], steps, demo["batch-size"], False,
                  physical_batch)
    textbook = Recipe("textbook Opacus + PEFT", ["q_proj", "v_proj"], 0, 0.01, steps_textbook,
                      demo["batch-size"], True)
    capped = Recipe(f"textbook, {textbook_physical_batch} sequence(s) per forward",
                    textbook.targets, 0, textbook.lr, steps_textbook, textbook.batch, True,
                    textbook_physical_batch)
    return textbook, capped, ours


class _Path:
    """One recipe's model, optimizer and draws, advanced a segment at a time."""

    def __init__(self, recipe: Recipe, train: Any, heldout: Any, source: str, epsilon: float,
                 delta: float, threads: int, seed: int = 0) -> None:
        import torch
        from opacus.accountants.utils import get_noise_multiplier

        from client import base_model
        from client.adapter import attach_lora
        from client.dp_plan import sample_rate

        self.recipe, self.train, self.heldout = recipe, train, heldout
        device = torch.device("cpu")
        quant = (base_model.Quantization("none", "float32", "textbook") if recipe.textbook
                 else base_model.choose_quantization("auto", device,
                                                     base_model.count_params(source)))
        base, _ = base_model.load_base(source, quant, device)
        self.model = attach_lora(base, 8, 16.0, 0.0, recipe.targets, 0, recipe.layers)
        # Opacus' make_private samples at 1 / len(data_loader), not batch / N
        self.q = (1 / math.ceil(len(train) / recipe.batch) if recipe.textbook
                  else sample_rate(len(train), recipe.batch))
        self.sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=self.q, steps=recipe.steps,
                                          accountant="rdp")
        self.curve = Curve(recipe, self.sigma)
        self.done, self.seconds = 0, 0.0
        torch.set_num_threads(threads)
        self._start(recipe, torch, seed)

    def _start(self, recipe: Recipe, torch: Any, seed: int) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        if recipe.textbook:
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            loader = DataLoader(TensorDataset(self.train.input_ids, self.train.attention_mask,
                                              self.train.labels), batch_size=recipe.batch)
            self.engine = PrivacyEngine(accountant="rdp")
            self.forward, self.optimizer, loader = self.engine.make_private(
                module=self.model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.sigma, max_grad_norm=1.0, poisson_sampling=True)
            if recipe.physical_batch:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                loader = BatchMemoryManager(data_loader=loader, optimizer=self.optimizer,
                                            max_physical_batch_size=recipe.physical_batch
                                            ).__enter__()
            self.batches = _forever(loader)
        else:
            from client.trainer import make_private

            self.forward, self.optimizer = make_private(
                self.model, optimizer, noise_multiplier=self.sigma, clip_norm=1.0,
                expected_batch=recipe.batch, noise=torch.Generator().manual_seed(2 * seed + 1))
            self.sampling = torch.Generator().manual_seed(2 * seed + 2)

    def advance(self, steps: int) -> None:
        import warnings

        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.model.train()
        start = time.perf_counter()
        for _ in range(min(steps, self.recipe.steps - self.done)):
            if self.recipe.textbook:
                self._textbook_step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self._our_step()
                self.optimizer.step()
            self.done += 1
            if self.recipe.textbook:
                self._check_accounted()
        self.seconds += time.perf_counter() - start

    def _check_accounted(self) -> None:
        """After each textbook step: the draw's physical batches are all used, and the
        accountant counted every step at this path's q and σ."""
        history = self.engine.accountant.history
        if self.optimizer._step_skip_queue or sum(n for _, _, n in history) != self.done \
                or any((s, q) != (self.sigma, self.q) for s, q, _ in history):
            raise RuntimeError(f"{self.recipe.name}: step {self.done} is not one accounted "
                               f"step at q={self.q:.4f}, sigma={self.sigma:.3f}: {history}")

    def _textbook_step(self) -> None:
        """One logical step: the physical batches of one draw, as Opacus' tutorial runs
        them (its optimizer skips the update until the draw's last part). An empty draw
        gets empty per-sample gradients, so that the step adds the noise only."""
        from client.trainer import noise_only

        while True:
            self.optimizer.zero_grad(set_to_none=True)
            ids, mask, labels = next(self.batches)
            if len(ids):
                self.forward(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            else:
                noise_only([p for p in self.model.parameters() if p.requires_grad])
            self.optimizer.step()
            if not self.optimizer._is_last_step_skipped:
                return

    def _our_step(self) -> None:
        from client.trainer import backward, noise_only, poisson_draw

        index = poisson_draw(len(self.train), self.q, self.sampling)
        if len(index) == 0:
            noise_only([p for p in self.model.parameters() if p.requires_grad])
            return
        backward(self.forward, self.optimizer, self.train.select(index),
                 batch_size=self.recipe.batch, private=True,
                 micro_batch=self.recipe.physical_batch)

    def evaluate(self) -> float:
        from client.evaluation import evaluate, perplexity

        ppl = perplexity(evaluate(self.model, self.heldout).loss)
        self.curve.points.append((self.done, self.seconds, ppl))
        return ppl

    @property
    def finished(self) -> bool:
        return self.done >= self.recipe.steps


def _forever(loader: Any):
    while True:
        yield from loader


def measure(model: str = "embedded", data: str = "embedded", partition: int = 0,
            epsilon: float = 8.0, delta: float = 1e-5, eval_every: int = 3, threads: int = 2,
            target_ppl: float = 0.0, quick: bool = False, seed: int = 0,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The curves and the time each path needs to reach the bar (`quick`: two steps each,
    to check that it runs; `seed` sets every path's draws and noise)."""
    import torch

    from client import base_model, cache
    from client.settings import ClientSettings, micro_batch
    from contracts.config import DEFAULTS

    torch.manual_seed(seed)  # the textbook paths' draws and noise (Opacus' global RNG)
    settings = ClientSettings.from_records(
        {**DEFAULTS, "model": model, "data": data, "server-round": 0},
        {"partition-id": partition})
    source = base_model.prepare_base(settings.model)
    tokenizer = base_model.load_tokenizer(source)
    client, train, heldout = cache.load_data(settings, tokenizer)
    quant = base_model.choose_quantization("auto", torch.device("cpu"),
                                           base_model.count_params(source))
    seq_len = train.input_ids.shape[1]
    # the textbook path is fp32: its micro-batches are the client's on a CPU without bf16
    paths = [_Path(r, train, heldout, source, epsilon, delta, threads, seed)
             for r in recipes(*((2, 2) if quick else (30, 0)),
                              physical_batch=micro_batch("auto", seq_len, quant.dtype),
                              textbook_physical_batch=micro_batch("auto", seq_len, "float32"))]
    eval_every = 1 if quick else eval_every
    for p in paths:
        echo(f"time-to-quality: {p.recipe.name}: q={p.q:.4f}, sigma={p.sigma:.3f}, "
             f"{p.recipe.steps} steps at ε={epsilon:g}: start ppl {p.evaluate():.1f}")
    ours = paths[-1]
    while running := [p for p in paths if _needed(p, ours, target_ppl)]:
        for p in running:
            p.advance(eval_every)
            echo(f"time-to-quality: {p.recipe.name}: step {p.done}/{p.recipe.steps}, "
                 f"{p.seconds:.0f}s, ppl {p.evaluate():.1f}")
    textbook, capped, mine = (p.curve for p in paths)
    bar = target_ppl or mine.points[-1][2]
    t_ours = mine.time_to(bar)
    speedup, at_least = _ratio(textbook, t_ours, bar)
    same_memory, same_memory_at_least = _ratio(capped, t_ours, bar)
    return {"client": client, "train": len(train), "heldout": len(heldout),
            "epsilon": epsilon, "delta": delta, "threads": threads, "seed": seed, "bar": bar,
            "curves": [_as_dict(c) for c in (textbook, capped, mine)],
            "textbook_s": textbook.time_to(bar), "capped_s": capped.time_to(bar),
            "ours_s": t_ours, "speedup": speedup, "speedup_at_least": at_least,
            "speedup_same_memory": same_memory,
            "speedup_same_memory_at_least": same_memory_at_least}


def _needed(p: _Path, ours: _Path, target_ppl: float) -> bool:
    """Whether `p` still has steps to run: all of fedslm's (they set the bar), and the
    others' until they reach it."""
    if p.finished or p is ours or not ours.finished:
        return not p.finished
    return p.curve.time_to(target_ppl or ours.curve.points[-1][2]) is None


def _ratio(other: Curve, t_ours: float | None, bar: float) -> tuple[float | None, float | None]:
    """(other's time to the bar / fedslm's, or None; a lower bound when `other` never got
    there)."""
    t_other = other.time_to(bar)
    if t_other and t_ours:
        return t_other / t_ours, None
    return None, (other.points[-1][1] / t_ours if t_other is None and t_ours else None)


def _as_dict(c: Curve) -> dict[str, Any]:
    r = c.recipe
    return {"name": r.name, "targets": ",".join(r.targets), "layers": r.layers, "lr": r.lr,
            "per_forward": r.physical_batch,
            "steps": r.steps, "batch": r.batch, "sigma": c.sigma,
            "points": [{"step": s, "seconds": t, "ppl": p} for s, t, p in c.points]}


def render(result: dict[str, Any]) -> list[str]:
    r = result
    rows = ["## Time to quality (DP, same ε)", "",
            f"Client `{r['client']}` ({r['train']} train / {r['heldout']} held-out sequences), "
            f"ε = {r['epsilon']:g}, δ = {r['delta']:g}, {r['threads']} threads; the paths in "
            "one process, alternating segments; training seconds only (evaluation untimed). "
            f"Quality bar: held-out perplexity {r['bar']:.1f} (fedslm's final). Once fedslm's "
            "steps are done, a textbook path that has reached the bar stops.", "",
            "| path | LoRA targets | layers | lr | sequences per forward | steps run | σ | "
            "time to the bar | last ppl | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c, t in zip(r["curves"], (r["textbook_s"], r["capped_s"], r["ours_s"]), strict=True):
        last = c["points"][-1]
        reached = f"{t:.0f} s" if t is not None else f"not reached in {last['seconds']:.0f} s"
        rows.append(f"| {c['name']} | {c['targets']} | {c['layers'] or 'all'} | {c['lr']:g} | "
                    f"{c['per_forward'] or 'the whole draw'} | {last['step']} of {c['steps']} | "
                    f"{c['sigma']:.3f} | {reached} | {last['ppl']:.1f} | "
                    f"{last['seconds'] / max(1, last['step']):.2f} |")
    rows += ["", "Time-to-quality speed-up, fedslm vs the textbook path: "
             f"{_verdict(r['speedup'], r['speedup_at_least'])} (target >= 2x); vs the textbook "
             "path split into the fp32 client's micro-batches (the memory the client keeps to "
             "without bf16): "
             f"{_verdict(r['speedup_same_memory'], r['speedup_same_memory_at_least'])}.",
             "", "Perplexity after each segment (step: ppl):", ""]
    for c in r["curves"]:
        rows.append(f"- {c['name']}: " + ", ".join(
            f"{p['step']}: {p['ppl']:.1f}" for p in c["points"]))
    return rows


def _verdict(speedup: float | None, at_least: float | None) -> str:
    if speedup is not None:
        return f"**{speedup:.2f}x**"
    if at_least is not None:
        return f"**more than {at_least:.2f}x** (that path never got there)"
    return "n/a"


def main() -> None:  # python -m simulations.time_to_quality
    import json
    import sys

    if len(sys.argv) > 2 or any(a.startswith("-") for a in sys.argv[1:]):
        sys.exit("usage: python -m simulations.time_to_quality [RESULT.json]")
    result = measure()
    print("\n".join(render(result)))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
