"""Each arm at its own learning rate (experiments/tuned.yaml): the grid's validation scores and each arm's choice.

The grid stage trains every (cell, optimizer, arm) at the protocol's lr times
each factor of ``tuned.grid`` (``tuned.factor``, which names the run folder),
one seed apart from the final ones; an arm may also be trained at factors
beyond the grid (where its best sat at the grid's edge), and every factor it
has is then a candidate. The final stage trains each arm at the factor whose
grid run scored best on the validation split (``best``: the best validation
value over its epochs). Ties go to the factor nearest 1, the protocol's own lr. A grid run stopped by a
non-finite training loss diverged at that lr: it scores the worst value there
is (±inf), so its factor is never chosen, while a run that failed for any other
reason, or never ran, leaves its factor missing and the grid incomplete. The choice is made here,
read from the grid's run directories, when a final job's config resolves
(``${xgrad_tuned_lr:...}``, xgrad/trained_config.py), so the same command run
again makes the same choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from xgrad.records import DIVERGED
from xgrad.report.readers import load_runs


class EveryFactorDiverged(ValueError):
    """An arm's grid is complete, but every one of its runs diverged: there is no lr to choose."""


@dataclass(frozen=True)
class Arm:
    """One arm of one cell on the grid: what it is and its validation score at each lr factor it has."""

    data: str
    model: str
    optimizer: str
    xgrad: bool
    mode: str | None
    factors: tuple[float, ...]  # ascending: every factor of the grid and any the arm was also trained at
    scores: tuple[float | None, ...]  # per factor; None: missing; ±inf, the worst value there is: diverged

    @property
    def title(self) -> str:
        return f"{self.data} · {self.model} · {self.optimizer} · {'XGrad' if self.xgrad else 'baseline'}"


def grid_arms(grid_dir: Path, grid: list[float]) -> list[Arm]:
    """Every arm the grid sweep in ``grid_dir`` trained, with its validation score at each factor of ``grid`` and at
    each further factor it was trained at (a grid extended for that arm: run folders are named by factor)."""
    scored: dict[tuple, dict[float, float]] = {}
    modes: dict[tuple, str | None] = {}
    for run in load_runs([grid_dir]) if grid_dir.is_dir() else []:
        factor = run.config.get("tuned.factor") if run.config else None
        if not is_factor(factor):
            continue
        key, factor = (run.data, run.model, run.optimizer, run.xgrad), float(factor)
        diverged = run.status == "failed" and (run.reason or "").startswith(DIVERGED) and run.mode in ("max", "min")
        scores = scored.setdefault(key, {})
        if run.usable or diverged:
            scores[factor] = (-math.inf if run.mode == "max" else math.inf) if diverged else run.best
            modes[key] = run.mode
        else:  # failed otherwise, or still running: that factor has no score yet, whether on the grid or beyond it
            scores.setdefault(factor, None)
            modes.setdefault(key, None)
    arms = []
    for key in sorted(scored):
        factors = tuple(sorted({*grid, *scored[key]}))
        arms.append(Arm(*key, modes[key], factors, tuple(scored[key].get(f) for f in factors)))
    return arms


def is_factor(value: object) -> bool:
    """Whether ``value`` is a lr factor: a positive finite number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def choose(arm: Arm) -> float:
    """The factor with the best validation score (ties: the one nearest 1); ValueError when any is missing or every
    one diverged."""
    missing = [f"×{f:g}" for f, score in zip(arm.factors, arm.scores) if score is None or math.isnan(score)]
    if missing:
        raise ValueError(f"the lr grid of {arm.title} lacks {', '.join(missing)}: run the grid stage first "
                         "(the study's command without tuned.stage=final)")  # fmt: skip
    if not any(math.isfinite(score) for score in arm.scores):
        raise EveryFactorDiverged(f"every lr of the grid of {arm.title} diverged: train it at smaller factors too "
                                  "(tuned.factor=<f1>,<f2> on the grid's command, as experiments/tuned.yaml shows)")  # fmt: skip
    sign = -1 if arm.mode == "max" else 1
    best = min(range(len(arm.factors)), key=lambda i: (sign * arm.scores[i], abs(math.log(arm.factors[i]))))
    return arm.factors[best]


def chosen_factor(grid_dir: Path, grid: list[float], data: str, model: str, optimizer: str, xgrad: bool) -> float:
    """The lr factor the final stage trains this arm at; ValueError (one line) when its grid is incomplete."""
    for arm in grid_arms(grid_dir, grid):
        if (arm.data, arm.model, arm.optimizer, arm.xgrad) == (data, model, optimizer, xgrad):
            return choose(arm)
    raise ValueError(f"no lr grid for {data} · {model} · {optimizer} · {'XGrad' if xgrad else 'baseline'} in "
                     f"{grid_dir}: run the grid stage first (the study's command without tuned.stage=final)")  # fmt: skip


def grid_notes(grid_dir: Path, grid: list[float]) -> list[str]:
    """One line per arm: its validation score at every factor it was trained at and the factor chosen."""
    lines = []
    for arm in grid_arms(grid_dir, grid):
        shown = ", ".join(f"×{factor:g}: {_score(score)}" for factor, score in zip(arm.factors, arm.scores))
        try:
            best = choose(arm)
            edge = " (at the edge of the grid: a lr beyond it might score better still)" if best in (arm.factors[0], arm.factors[-1]) else ""
            choice = f"chosen ×{best:g}{edge}"
        except EveryFactorDiverged:
            choice = "no choice: every factor diverged"
        except ValueError:
            choice = "no choice yet: grid incomplete"
        lines.append(f"lr grid, {arm.title} (best validation value per factor of the protocol's lr): {shown}; {choice}.")
    return lines


def _score(score: float | None) -> str:
    """A factor's score as the page shows it: its value, ``diverged``, or ``—`` where no run scored it."""
    if score is None:
        return "—"
    return f"{score:.4g}" if math.isfinite(score) else "diverged"
