"""The library installs into anyone's environment: torch as a range, nothing of the suite.

``pip install xgrad`` must work next to whatever torch a user has, so the
package declares ``torch`` alone, as a range, and its library modules import
nothing else; the training suite's dependencies are the ``suite`` extra. The
exact versions this repository is tested with live in ``constraints.txt``.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the library: what a user copies into their own training code
LIBRARY_FILES = ["xgrad/__init__.py", *(str(p.relative_to(REPO)) for p in sorted((REPO / "xgrad").glob("*.py"))
                                        if p.stem in ("predict", "rules")),
                 *(str(p.relative_to(REPO)) for p in sorted((REPO / "xgrad" / "optim").glob("*.py")))]
#: packages of the suite and of the framework integrations that `import xgrad` must not pull in
SUITE_ONLY = ("hydra", "omegaconf", "wandb", "timm", "torchvision", "datasets", "pandas", "scipy", "matplotlib",
              "sacrebleu", "sentencepiece", "rich", "lightning", "pytorch_lightning", "transformers", "accelerate")
#: each integration (xgrad/integrations/<name>.py, the extra <name>) and the frameworks it alone may import
INTEGRATIONS = {"lightning": {"lightning"}, "transformers": {"transformers", "accelerate"}}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_the_library_declares_torch_alone_as_a_range():
    dependencies = _pyproject()["project"]["dependencies"]
    assert [_name(d) for d in dependencies] == ["torch"]
    assert "==" not in dependencies[0] and ">=" in dependencies[0]


def test_the_extras_are_ranges_and_the_lock_pins_the_tested_pairing():
    extras = _pyproject()["project"]["optional-dependencies"]
    reference_implementations = {"adabelief-pytorch"}  # compared bit for bit: one exact version
    pinned = [r for group in extras.values() for r in group if "==" in r and _name(r) not in reference_implementations]
    assert not pinned, f"extras must be ranges, pinned: {pinned}"
    assert {"hydra-core", "wandb", "timm", "torchvision"} <= {_name(r) for r in extras["suite"]}
    lock = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert (lock["torch"], lock["torchvision"]) == ("2.14.1", "0.29.1")
    declared = {_name(r) for group in (_pyproject()["project"]["dependencies"], *extras.values()) for r in group}
    assert declared <= {name.lower() for name in lock}, "every declared package has its tested version in the lock"
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def _imports_at_import_time(relative: str) -> list[str]:
    """What a file imports when it is imported: top level, try/if blocks and class bodies; not function bodies."""
    names, nodes = [], list(ast.parse((REPO / relative).read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nodes.extend(ast.iter_child_nodes(node))
    return names


def test_library_modules_import_only_torch_and_the_standard_library():
    """At import time; a function may import more where it needs it."""
    allowed = {"torch", "xgrad"} | set(sys.stdlib_module_names)
    for relative in LIBRARY_FILES:
        for name in _imports_at_import_time(relative):
            assert name.split(".")[0] in allowed, f"{relative} imports {name}"


def test_each_integration_imports_only_its_framework_which_is_its_extra_and_installed():
    allowed = {"torch", "xgrad"} | set(sys.stdlib_module_names)
    extras = _pyproject()["project"]["optional-dependencies"]
    installed = re.search(r"pip install .*-e '\.\[([^]]*)\]'", (REPO / "Makefile").read_text()).group(1).split(",")
    for name, frameworks in INTEGRATIONS.items():
        for module in _imports_at_import_time(f"xgrad/integrations/{name}.py"):
            assert module.split(".")[0] in allowed | frameworks, f"xgrad/integrations/{name}.py imports {module}"
        assert {_name(r) for r in extras[name]} == frameworks, f"the extra {name!r} declares its frameworks"
        assert name in installed, f"make install installs the extra {name!r}, so the tests run its integration"


def test_import_xgrad_loads_nothing_of_the_suite():
    """In a fresh interpreter (this one has loaded the suite already)."""
    code = ("import sys, json, xgrad, xgrad.integrations; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True, cwd=REPO).stdout))
    assert "torch" in loaded
    assert not loaded & set(SUITE_ONLY), f"import xgrad loaded {sorted(loaded & set(SUITE_ONLY))}"


def test_the_package_ships_its_type_annotations():
    """PEP 561: a py.typed marker in the package, declared as package data so that wheels carry it."""
    assert (REPO / "xgrad" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["xgrad"]


@pytest.mark.parametrize("modules", ["xgrad.engine", "xgrad.trained_config, xgrad.records"])
def test_the_engine_and_what_the_reports_share_with_it_load_neither_hydra_nor_omegaconf(modules):
    """docs/design.md's import rules: the engine and the light modules read the schema's dataclasses and the records
    without loading Hydra or OmegaConf (the schema registers itself with Hydra at the first check)."""
    code = f"import sys, json, {modules}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True, cwd=REPO).stdout))  # fmt: skip
    assert not loaded & {"hydra", "omegaconf"}
