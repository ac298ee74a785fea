"""A W&B report per figure, as code: one section per cell, baseline vs XGrad over seeds, the page's numbers beside.

    python scripts/wandb_report.py adam --scale quick --entity <team>      # creates it (needs `wandb login`)
    python scripts/wandb_report.py adam --scale quick --dry-run           # prints what it would create

The cells come from the committed page (``results/<scale>/<figure>.md``) and its
raw data (``results/<scale>/<figure>/runs.csv``): each run's ``cell`` is computed
from the config it trained (``run.config``), as the run itself computed the
``cell`` key of its W&B config (xgrad/trained_config.py). Each section holds the
page's rows for that cell and a panel grid whose run set is the cell's runs
(``Config('cell') == ...``) grouped by ``arm`` (and by ``xgrad.steps`` where the
cell has several s), with the validation and test metric per epoch as the mean
over seeds ± one standard error. Runs logged before runs carried ``cell`` are not
found by these filters. W&B's reports API is the optional extra ``reports``
(``pip install -e '.[reports]'``); building the report needs no account, saving it does.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xgrad.trained_config import cell  # noqa: E402


@dataclass
class Section:
    """One cell of the figure: what the report shows for it."""

    cell: str
    title: str
    metric: str
    steps: list[int]  # the s of its XGrad runs
    runs: int
    rows: list[str]  # the page's main-table lines for it


def sections(page: Path) -> list[Section]:
    """The figure's cells, from the page's raw data and its main table; FileNotFoundError naming what is missing."""
    raw = page.with_suffix("") / "runs.csv"
    if not page.is_file() or not raw.is_file():
        raise FileNotFoundError(f"{page} and {raw} must both exist (a figure's page and its raw data)")
    runs = pd.read_csv(raw, keep_default_na=False)
    runs = runs[runs["run.status"] == "completed"].copy()  # a job that died or never started has no curves to show
    runs["cell"] = [cell(json.loads(config)) for config in runs["run.config"]]
    header, rows = _main_table(page)
    triples = runs.groupby(["data", "model", "optimizer"])["cell"].nunique()
    found = []
    for cell_id, group in runs.groupby("cell", sort=False):
        data, model, optimizer = group.iloc[0][["data", "model", "optimizer"]]
        # the page names a cell set apart by a setting "adam (optimizer.lr=...)": its rows are all of the triple's
        mine = [line for line in rows if _cells(line)[:2] == [data, model] and _cells(line)[2].split(" (")[0] == optimizer]
        title = f"{data} · {model} · {optimizer}" + (f" · {cell_id.rsplit('/', 1)[1]}" if triples[data, model, optimizer] > 1 else "")
        found.append(Section(
            cell=cell_id, title=title, metric=str(group.iloc[0]["metric"]),
            steps=sorted({int(s) for s in group["s"] if int(s) > 0}), runs=len(group), rows=[*header, *mine],
        ))  # fmt: skip
    return found


def _main_table(page: Path) -> tuple[list[str], list[str]]:
    """The header (two lines) and the rows of the page's first table."""
    lines = page.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| data | model |")), None)
    if start is None:
        raise ValueError(f"{page} has no table of cells (no completed run?)")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start : start + 2], lines[start + 2 : end]


def _cells(line: str) -> list[str]:
    return [part.strip() for part in line.strip("|").split("|")]


def build(figure: str, scale: str, found: list[Section], entity: str, project: str):
    """The report (``wandb_workspaces.reports.v2.Report``), built without contacting W&B."""
    import wandb_workspaces.reports.v2 as wr

    blocks = [wr.MarkdownBlock(f"Baseline vs XGrad over seeds for the `{figure}` figure at `{scale}` scale: per cell, "
                               "the page's rows (results/ in the repository) and the validation and test curves per "
                               "epoch, mean over seeds ± one standard error, grouped by arm."),
              wr.TableOfContents()]  # fmt: skip
    for section in found:
        grouping = ["config.arm"] + (["config.xgrad.steps"] if len(section.steps) > 1 else [])
        runset = wr.Runset(entity=entity, project=project, name=section.title,
                           filters=f"Config('cell') == '{section.cell}'", groupby=grouping)  # fmt: skip
        plots = [wr.LinePlot(title=f"{split}/{section.metric} by arm", x="epoch", y=[f"{split}/{section.metric}"],
                             groupby_aggfunc="mean", groupby_rangefunc="stderr") for split in ("val", "test")]  # fmt: skip
        blocks += [wr.H2(section.title), wr.P(f"cell {section.cell} · {section.runs} runs in the page's raw data"),
                   wr.MarkdownBlock("\n".join(section.rows)), wr.PanelGrid(runsets=[runset], panels=plots)]  # fmt: skip
    return wr.Report(project=project, entity=entity, title=f"XGrad vs baseline: {figure} ({scale} scale)",
                     description="Built by scripts/wandb_report.py from the committed page", blocks=blocks)  # fmt: skip


def describe(figure: str, scale: str, found: list[Section], entity: str, project: str) -> str:
    """What the report holds, as ``--dry-run`` prints it."""
    lines = [f"report 'XGrad vs baseline: {figure} ({scale} scale)' in {entity or '<default entity>'}/{project}: "
             f"{len(found)} section(s)"]  # fmt: skip
    for section in found:
        by = "arm" + (", xgrad.steps" if len(section.steps) > 1 else "")
        lines.append(f"  {section.title}: runs with cell == {section.cell}, grouped by {by}; "
                     f"val/{section.metric} and test/{section.metric} per epoch, mean ± stderr; "
                     f"{len(section.rows) - 2} table row(s)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("figure", help="the experiment's name (experiments/<figure>.yaml)")
    parser.add_argument("--scale", default="quick", help="the page's scale (results/<scale>/)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="the results folder")
    parser.add_argument("--entity", default="", help="W&B entity (default: the account's)")
    parser.add_argument("--project", default="xgrad-repro", help="W&B project the runs were logged to")
    parser.add_argument("--dry-run", action="store_true", help="print what would be created; create nothing")
    args = parser.parse_args(argv)
    try:
        found = sections(args.results / args.scale / f"{args.figure}.md")
    except (FileNotFoundError, ValueError) as missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    print(describe(args.figure, args.scale, found, args.entity, args.project))
    try:
        report = build(args.figure, args.scale, found, args.entity, args.project)
    except ImportError:
        print("error: W&B's reports API is not installed: pip install -e '.[reports]'", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    try:
        report.save()
    except Exception as error:  # noqa: BLE001 -- no account, no network: one line, nothing created
        print(f"error: the report could not be created ({type(error).__name__}: {error}); `wandb login` first",
              file=sys.stderr)  # fmt: skip
        return 1
    print(report.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
