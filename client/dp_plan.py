"""A round's DP plan: what the ledger is charged for and what the trainer must run.

It is decided once per round (client/charge.py), before training, and handed to the
trainer as it is: the sample rate q, the noise multiplier σ, the clipping norm and the
number of steps. The trainer refuses data the plan was not made for and checks, after
training, that it ran exactly the steps that were charged.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlanError(RuntimeError):
    """Training that does not match the plan it was charged for (a bug, not bad input)."""


def sample_rate(num_examples: int, batch_size: int) -> float:
    """q: each example's chance to be drawn at a step, for an expected batch of `batch_size`."""
    return min(1.0, batch_size / num_examples)


@dataclass(frozen=True, kw_only=True)
class DPPlan:
    sample_rate: float  # q of the Poisson draws
    steps: int  # draws, each one a noised step under DP (empty draws included)
    expected_batch: int  # the loss is averaged over it (Opacus' expected batch size)
    noise_multiplier: float = 0.0  # σ
    clip_norm: float | None = None  # None: plain training, without clipping or noise

    @property
    def private(self) -> bool:
        return self.clip_norm is not None

    @classmethod
    def for_data(cls, *, num_examples: int, batch_size: int, steps: int,
                 noise_multiplier: float = 0.0, clip_norm: float | None = None) -> DPPlan:
        """The plan for `steps` draws from `num_examples` examples (q derived here)."""
        return cls(sample_rate=sample_rate(num_examples, batch_size), steps=steps,
                   expected_batch=batch_size, noise_multiplier=noise_multiplier,
                   clip_norm=clip_norm)

    def check_data(self, num_examples: int) -> None:
        """PlanError unless the plan's q is the one of `num_examples` examples."""
        q = sample_rate(num_examples, self.expected_batch)
        if q != self.sample_rate:
            raise PlanError(f"the plan's sample rate {self.sample_rate:.6g} is not that of "
                            f"{num_examples} examples ({q:.6g})")

    def check_ran(self, steps: int) -> None:
        """PlanError unless training ran (under DP: noised) exactly the charged steps."""
        if steps != self.steps:
            kind = "noised " if self.private else ""
            raise PlanError(f"training ran {steps} {kind}steps; {self.steps} were charged")
