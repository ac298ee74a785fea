"""A page's raw data: ``runs.csv`` (one row per run) and ``curves.csv`` (one row per run and epoch).

Every number of a results page comes from these two files, which are
committed beside it (``results/<scale>/<figure>/``), so that a reviewer can
re-derive each verdict without the run directories, which stay on the machine
that trained them. ``scripts/make_tables.py <folder holding runs.csv>`` rebuilds
the page from them alone, byte for byte (tests/test_reports.py).

``runs.csv`` starts with the columns a reader needs to redo a comparison —
``data, model, optimizer, s, seed, arm, metric, direction, value`` (``value``:
the test metric at the epoch the validation split selected; ``arm``:
``xgrad`` when the run predicts (s > 0), else ``baseline``, as in its
summary.json; ``s``: XGrad's steps, 0 for a baseline) — then what
says how the value was obtained (selected epoch, epochs and optimizer steps
trained, lr, evaluation sizes, wall time, hardware, status), and last every
other field of :class:`xgrad.report.runs.Run`, JSON-encoded where it is not a
plain value, so that reading the file gives back the records the page was
rendered from. ``curves.csv`` holds, per run (keyed by its ``path``) and epoch, the
validation and test metric and the optimizer steps and seconds spent by the
end of that epoch (column ``series``: val, test, steps, seconds).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from xgrad import atomic
from xgrad.report.runs import Run

RUNS, CURVES = "runs.csv", "curves.csv"
#: the first columns of runs.csv, in this order, exactly so named
KEY_COLUMNS = ["data", "model", "optimizer", "s", "seed", "arm", "metric", "direction", "value"]
#: then how the value was obtained
DETAIL_COLUMNS = ["selected_epoch", "epochs", "optimizer_steps", "lr", "val_size", "test_size", "size_unit",
                  "wall_time_s", "hardware", "precision", "status", "reason"]  # fmt: skip
#: Run fields whose values runs.csv holds as JSON (containers)
_JSON_FIELDS = ("data_sizes", "evaluated", "config", "overrides")
#: Run fields that live in curves.csv instead
_CURVE_FIELDS = ("curve", "test_curve", "timeline")
#: curves.csv's series: the validation and test metric per epoch, and the optimizer steps and seconds by its end
SERIES = ("val", "test", "steps", "seconds")


def frames(runs: list[Run], relative_to: Path | None = None):
    """(runs, curves) as two pandas DataFrames in the layout of the module docstring."""
    import pandas as pd

    rows, curve_rows = [], []
    for run in runs:
        path = _shown(run.path, relative_to)
        sizes = {**(run.data_sizes or {}), **(run.evaluated or {})}  # what was evaluated, else the splits' sizes
        key = {
            "data": run.data, "model": run.model, "optimizer": run.optimizer, "s": run.steps if run.xgrad else 0,
            "seed": run.seed, "arm": "xgrad" if run.xgrad and run.steps > 0 else "baseline", "metric": run.metric,
            "direction": run.mode, "value": run.test,
        }  # fmt: skip
        detail = {
            "selected_epoch": run.best_epoch, "epochs": run.epochs, "optimizer_steps": run.optimizer_steps,
            "lr": run.config.get("optimizer.lr"), "val_size": sizes.get("val"), "test_size": sizes.get("test"),
            "size_unit": sizes.get("unit"), "wall_time_s": run.wall_time_s, "hardware": run.hardware,
            "precision": run.precision, "status": run.status, "reason": run.reason,
        }  # fmt: skip
        rest = {}
        for f in dataclasses.fields(Run):
            if f.name in _CURVE_FIELDS:
                continue
            value = getattr(run, f.name)
            if f.name == "path":
                value = path
            elif f.name in _JSON_FIELDS:
                value = None if value is None else json.dumps(list(value) if f.name == "overrides" else value,
                                                              sort_keys=True)  # fmt: skip
            rest[f"run.{f.name}"] = value
        rows.append(key | detail | rest)
        series = {"val": run.curve, "test": run.test_curve, "steps": [(e, s) for e, s, _ in run.timeline],
                  "seconds": [(e, t) for e, _, t in run.timeline]}  # fmt: skip
        for name in SERIES:
            curve_rows += [{"path": path, "series": name, "epoch": epoch, "value": value}
                           for epoch, value in series[name] if value is not None]  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(curve_rows, columns=["path", "series", "epoch", "value"])


def write(runs: list[Run], folder: Path, relative_to: Path | None = None) -> list[Path]:
    """Write runs.csv and curves.csv into ``folder`` (each atomically); paths shown relative to ``relative_to``."""
    table, curves = frames(runs, relative_to)
    written = []
    for name, frame in ((RUNS, table), (CURVES, curves)):
        path = Path(folder) / name
        atomic.write_text(path, frame.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
        written.append(path)
    return written


def read(folder: Path) -> list[Run]:
    """The runs a folder's runs.csv and curves.csv hold, as the records they were written from."""
    import pandas as pd

    folder = Path(folder)
    if not (folder / RUNS).is_file():
        raise FileNotFoundError(f"no {RUNS} in {folder}")
    table = pd.read_csv(folder / RUNS, dtype=object, keep_default_na=False, na_values=[""])
    curves = pd.read_csv(folder / CURVES, keep_default_na=False, na_values=[""]) if (folder / CURVES).is_file() else None
    types = {f.name: f.type for f in dataclasses.fields(Run)}
    runs = []
    for row in table.to_dict("records"):
        values = {}
        for name, kind in types.items():
            if name in _CURVE_FIELDS:
                continue
            values[name] = _parsed(name, str(kind), row.get(f"run.{name}"))
        run = Run(**values)
        if curves is not None:
            mine = curves[curves["path"] == str(run.path)]
            series = {name: {int(e): float(v) for e, v in zip(part["epoch"], part["value"])}
                      for name, part in ((name, mine[mine["series"] == name]) for name in SERIES)}  # fmt: skip
            run.curve, run.test_curve = list(series["val"].items()), list(series["test"].items())
            steps, seconds = series["steps"], series["seconds"]
            run.timeline = [(e, None if e not in steps else int(steps[e]), seconds.get(e))
                            for e in sorted(steps.keys() | seconds.keys())]  # fmt: skip
        runs.append(run)
    return runs


def _parsed(name: str, kind: str, text: Any) -> Any:
    """A runs.csv cell back as the Run field ``name`` of (annotated) type ``kind``."""
    if text is None or (isinstance(text, float) and text != text):  # an empty cell
        return None if name not in ("reason", "config", "world_size", "xgrad", "steps", "status") else {
            "reason": "", "config": {}, "world_size": 1, "xgrad": False, "steps": 0, "status": "missing"}[name]
    if name == "path":
        return Path(text)
    if name in _JSON_FIELDS:
        value = json.loads(text)
        return tuple(value) if name == "overrides" else value
    if kind.startswith("bool"):
        return text == "True"
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text


def _shown(path: Path, relative_to: Path | None) -> str:
    if relative_to is not None:
        try:
            return str(Path(path).resolve().relative_to(Path(relative_to).resolve()))
        except ValueError:
            pass
    return str(path)


PAGE = "page.json"


def publish(runs: list[Run], page: Path, title: str, notes: list[str] | None = None,
            relative_to: Path | None = None) -> str:  # fmt: skip
    """Write ``page`` (Markdown) and, in the folder of its name (``results/<scale>/<figure>/``), its raw data.

    The page is rendered from the raw files as written and read back, with
    the title and notes kept beside them (``page.json``), so that
    :func:`rebuild` gives the same page from that folder alone.
    """
    from xgrad.report.tables import render

    folder = Path(page).with_suffix("")
    write(runs, folder, relative_to)
    atomic.write_text(folder / PAGE, json.dumps({"title": title, "notes": list(notes or [])}, indent=2) + "\n")
    text = render(read(folder), title, notes=list(notes or []))
    atomic.write_text(Path(page), text)
    return text


def rebuild(folder: Path, title: str | None = None) -> str:
    """The page of a raw-data folder, from its files alone (:func:`publish` wrote them)."""
    from xgrad.report.tables import render

    folder = Path(folder)
    saved = json.loads((folder / PAGE).read_text()) if (folder / PAGE).is_file() else {}
    return render(read(folder), title or saved.get("title") or "XGrad vs baseline", notes=saved.get("notes", []))
