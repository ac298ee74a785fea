"""Fetch the datasets the configs read into one root folder, or report what is there.

On a connected machine this downloads every dataset that is missing under
``--root`` (the folder runs read as ``data.root``); offline, or with
``--check``, it only reports which datasets are present and what is missing.
Each dataset's loader module knows its own files: it exposes
``missing(root) -> str | None`` (None when present) and ``fetch(root)``, and
this script only calls them::

    python scripts/prepare_data.py --root data                  # fetch everything missing
    python scripts/prepare_data.py cifar10 mnist --root data    # only these
    python scripts/prepare_data.py --check --root data          # report, no network

It exits with status 1 when something asked for is still missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

# Dataset name (as in conf/data and in "dataset missing" errors) → its loader module
# and the keyword arguments its fetch/missing take (one module serves both CIFARs).
DATASETS: dict[str, tuple[str, dict[str, str]]] = {
    "fashion_mnist": ("xgrad.data.fashion_mnist", {}),
    "mnist": ("xgrad.data.mnist", {}),
    "cifar10": ("xgrad.data.cifar", {"variant": "cifar10"}),
    "cifar100": ("xgrad.data.cifar", {"variant": "cifar100"}),
    "ptb": ("xgrad.data.ptb", {}),
    "wmt16_en_de": ("xgrad.data.wmt16", {}),
}


def _loader(name: str) -> ModuleType | None:
    """The dataset's loader module, or None when that module is not in this checkout."""
    module_name = DATASETS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the loader exists but one of its imports is broken
            raise
        return None


def check(root: str, names: list[str]) -> dict[str, str | None]:
    """What is missing for each dataset under root: None when present, else a description."""
    report = {}
    for name in names:
        loader = _loader(name)
        if loader is None:
            report[name] = f"no loader module {DATASETS[name][0]} in this checkout"
        else:
            report[name] = loader.missing(root, **DATASETS[name][1])
    return report


def fetch_missing(root: str, names: list[str]) -> dict[str, str | None]:
    """Fetch every dataset missing under root; returns what is still missing afterwards."""
    report = check(root, names)
    for name, what in report.items():
        loader = _loader(name)
        if what is None or loader is None:
            continue
        try:
            loader.fetch(root, **DATASETS[name][1])
        except Exception as error:  # offline, a mirror down, a full disk: report it and go on
            report[name] = f"{what} (fetch failed: {type(error).__name__}: {error})"
        else:
            report[name] = loader.missing(root, **DATASETS[name][1])
    return report


def print_report(root: str, report: dict[str, str | None]) -> None:
    table = Table(title=f"datasets under {Path(root).resolve()}")
    table.add_column("dataset")
    table.add_column("status")
    table.add_column("missing")
    for name, what in report.items():
        table.add_row(name, "[green]present[/]" if what is None else "[red]missing[/]", what or "")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="dataset",
                        help=f"datasets to prepare (default: all of {', '.join(DATASETS)})")
    parser.add_argument("--root", default="data", help="folder the runs read as data.root (default: ./data)")
    parser.add_argument("--check", action="store_true", help="only report what is present and missing")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    names = args.names or list(DATASETS)
    report = check(args.root, names) if args.check else fetch_missing(args.root, names)
    print_report(args.root, report)
    return 1 if any(what is not None for what in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
