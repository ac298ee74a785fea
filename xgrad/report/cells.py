"""Runs → :class:`~xgrad.report.runs.Cell` s: which runs are compared, and which are left out and why.

A cell is one (data, model, optimizer, scale) combination, split further by the
config values that set its runs apart (a swept ``optimizer.lr``: :func:`set_apart`).
:func:`group_cells` puts each usable run into its cell's baseline or its XGrad
runs of one ``s``, each seed once per arm; :func:`problems` lists every run left
out with why (not usable, or a repeat of a seed: :func:`duplicates`), and
:func:`unpaired_seeds` each seed that ran on one side of a comparison only.

Which config keys differ among runs is a question about a table (a row per
run, a column per key: the columns with more than one value), so pandas
answers it. Finding repeats and placing runs into cells stay with dicts: each
run's identity hashed once, in the order the runs came (the first run of a
seed is the one counted), the Run objects at hand, which a DataFrame would
only wrap and unwrap. pandas loads when grouping starts, not with the package.
"""

from __future__ import annotations

from xgrad.report.runs import Cell, Run

#: keys that pick a run's side of a comparison or its repetition, not its cell
_ARM_KEYS = {"seed", "xgrad.enabled", "xgrad.steps"}

#: the value of a key that a run's config lacks: compared like any other value
_ABSENT = "<absent>"


def group_cells(runs: list[Run]) -> list[Cell]:
    """Usable runs grouped into cells, sorted by (data, model, optimizer, scale, setting).

    Runs of the same (data, model, optimizer, scale) that differ in any other
    value of what they train (a swept ``optimizer.lr``, say) make separate
    cells, named by those values (:func:`set_apart`). Within one arm (baseline,
    or one ``s``) of a cell a seed appears once: a second run of the same seed
    is left out of the statistics and reported by :func:`problems`. Runs of one
    cell that disagree on the metric or its direction are refused.
    """
    settings = set_apart(runs)
    repeats = duplicates(runs, settings)
    counted = [run for run in runs if run.usable and id(run) not in repeats]
    cells: dict[tuple, Cell] = {}

    def cell_of(run: Run, setting: tuple) -> Cell:
        cell = cells.setdefault(
            (*_place(run), _hashable(setting)),
            Cell(run.data, run.model, run.optimizer, run.scale, run.metric, run.mode, setting=setting),
        )
        if (run.metric, run.mode) != (cell.metric, cell.mode):
            raise ValueError(
                f"runs of {cell.title} disagree on the metric: {cell.metric} ({cell.mode}) "
                f"vs {run.metric} ({run.mode}) in {run.path}"
            )
        return cell

    for run in counted:
        if run.xgrad:
            common, predicting = settings[id(run)]
            cell_of(run, common + predicting).xgrad.setdefault(run.steps, []).append(run)
    for run in counted:
        if not run.xgrad:  # the baseline of every cell its common setting matches (several XGrad rules: one baseline)
            common, _ = settings[id(run)]
            matching = [c for key, c in cells.items() if key[:4] == _place(run) and c.setting[: len(common)] == common]
            for cell in matching or [cell_of(run, common)]:
                cell.baseline.append(run)
    for cell in cells.values():
        if not cell.baseline and 0 in cell.xgrad:
            cell.baseline = cell.xgrad.pop(0)
        cell.xgrad = dict(sorted(cell.xgrad.items()))
    return sorted(cells.values(), key=lambda c: tuple(str(part) for part in (*_place(c), c.setting)))


def problems(runs: list[Run]) -> list[tuple[Run, str]]:
    """Runs that are left out of the statistics, each with why."""
    repeats = duplicates(runs)
    left_out = []
    for run in runs:
        if not run.usable:
            left_out.append((run, f"{run.status}: {run.reason or 'no reason given'}"))
        elif id(run) in repeats:
            left_out.append((run, f"duplicate of seed {run.seed} in {repeats[id(run)].path}; not counted"))
    return left_out


def unpaired_seeds(cell: Cell) -> list[str]:
    """One line per seed that ran on one side of a comparison but not on the other."""
    lines = []
    base_seeds = {run.seed for run in cell.baseline}
    for steps, runs in cell.xgrad.items():
        xgrad_seeds = {run.seed for run in runs}
        for seed in sorted(base_seeds - xgrad_seeds, key=str):
            lines.append(f"{cell.title}: seed {seed} has a baseline but no XGrad s={steps} run")
        for seed in sorted(xgrad_seeds - base_seeds, key=str):
            lines.append(f"{cell.title}: seed {seed} has an XGrad s={steps} run but no baseline")
    return lines


def duplicates(runs: list[Run], settings: dict[int, tuple] | None = None) -> dict[int, Run]:
    """For each usable run (by ``id``) that repeats an earlier one, the first run it repeats.

    A repeat is a usable run of the same cell (setting included), arm and seed
    as an earlier usable run; a run without a seed repeats nothing. One pass
    over ``runs``, each run's identity hashed. ``settings`` is
    :func:`set_apart`'s answer for ``runs`` when the caller has it already.
    """
    settings = set_apart(runs) if settings is None else settings
    first: dict[tuple, Run] = {}
    repeats = {}
    for run in runs:
        if run.usable and run.seed is not None:
            earlier = first.setdefault(_hashable(_identity(run, settings)), run)
            if earlier is not run:
                repeats[id(run)] = earlier
    return repeats


def set_apart(runs: list[Run]) -> dict[int, tuple[tuple, tuple]]:
    """For each usable run (by ``id``), the config values that set it apart from its neighbours.

    Neighbours are the usable runs of the same (data, model, optimizer, scale).
    A key sets runs apart when its value differs among them — a key one run
    lacks counts as a value of its own — except the seed and the arm
    (``xgrad.enabled``, ``xgrad.steps``) and the keys a run's config names under
    ``tuned.per_arm`` (each arm tuned for itself). Returned per run as two tuples of
    (dotted key, value): the keys every run has a say in, and the other
    ``xgrad.*`` keys (rule, decoupled decay), which mean something only for
    runs that predict and are compared among those alone (empty for a
    baseline). Runs that recorded no config (a W&B run without one, a
    directory without ``.hydra/``) set nothing apart.
    """
    neighbours: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.usable:
            neighbours.setdefault(_place(run), []).append(run)
    settings = {}
    for group in neighbours.values():
        recorded = [run for run in group if run.config]
        # keys each arm sets for itself (experiments/tuned.yaml: each arm at its own lr) pair the arms across them
        per_arm = {key for run in recorded for key in run.config.get("tuned.per_arm") or ()}
        common = _differing_keys(recorded, lambda key: not key.startswith("xgrad.") and key not in per_arm)
        predicting = _differing_keys([run for run in recorded if run.xgrad], lambda key: key.startswith("xgrad."))
        for run in group:
            settings[id(run)] = (_values(run, common), _values(run, predicting) if run.xgrad else ())
    return settings


def _differing_keys(runs: list[Run], considered) -> set[str]:
    """The keys ``considered`` (the arm's never) whose value differs among ``runs``, compared by ``repr``."""
    import pandas as pd

    table = pd.DataFrame(
        [{key: repr(value) for key, value in run.config.items() if considered(key) and key not in _ARM_KEYS}
         for run in runs]
    )  # fmt: skip
    differs = table.fillna(repr(_ABSENT)).nunique() > 1
    return set(differs.index[differs])


def _values(run: Run, keys: set[str]) -> tuple[tuple[str, object], ...]:
    return tuple((key, run.config.get(key, _ABSENT)) for key in sorted(keys)) if run.config else ()


def _place(record: Run | Cell) -> tuple[str, str, str, str]:
    """(data, model, optimizer, scale): what a cell is before the values that set its runs apart."""
    return record.data, record.model, record.optimizer, record.scale or ""


def _identity(run: Run, settings: dict[int, tuple]) -> tuple:
    """What two runs share when one repeats the other: cell, setting, arm and seed."""
    arm = (run.xgrad, run.steps if run.xgrad else 0)
    return (run.data, run.model, run.optimizer, run.scale, settings[id(run)], *arm, run.seed)


def _hashable(value):
    """``value`` as a dict key, equal to another exactly where the values are equal.

    Config values are JSON's: a list becomes a tuple, a mapping a frozenset of
    its items (the tuples around them stay tuples).
    """
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, dict):
        return frozenset((key, _hashable(item)) for key, item in value.items())
    return value
