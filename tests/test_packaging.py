"""Packaging: what pyproject.toml declares is what the code imports and what was tested.

- every third-party package that inf_llm/ imports is declared (PyYAML was imported by config.py and declared
  nowhere);
- requirements.txt and requirements-test.txt pin every dependency exactly: that is the set CI tests;
- each lower bound in pyproject.toml is a tested version: the pin (CI), or for torch, transformers and triton
  the versions the GPU machine ran the suite with (README, "Measured so far"), so no bound promises a release
  nothing ran on.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# Versions tested besides the pins: the GPU machine's own torch, transformers and triton.
TESTED_ON_THE_GPU_MACHINE = {"torch": "2.11", "transformers": "5.17", "triton": "3.6"}
# Imports whose distribution is not installed here (optional extras) or ships inside another declared one.
DISTRIBUTION_OF = {"faiss": "faiss-cpu", "ray": "ray", "pydantic_core": "pydantic"}


def requirements(name: str) -> dict[str, Requirement]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def declared(group: str | None = None) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    items = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, items)}


def lower_bound(req: Requirement) -> str | None:
    found = [s.version for s in req.specifier if s.operator == ">="]
    return found[0] if found else None


def imported_distributions() -> dict[str, list[str]]:
    """Distribution -> the inf_llm files importing it (module-level and function-level imports alike)."""
    packages = importlib.metadata.packages_distributions()
    out: dict[str, list[str]] = {}
    for path in sorted((REPO_ROOT / "inf_llm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "inf_llm":
                    continue
                dist = DISTRIBUTION_OF.get(top) or packages[top][0]
                out.setdefault(canonicalize_name(dist), []).append(str(path.relative_to(REPO_ROOT)))
    return out


def test_every_imported_package_is_declared():
    everything = dict(declared())
    for group in PYPROJECT["project"]["optional-dependencies"]:
        everything.update(declared(group))
    missing = {dist: files for dist, files in imported_distributions().items() if dist not in everything}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_requirements_pin_every_dependency():
    pins = requirements("requirements.txt")
    for name, req in pins.items():
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"requirements.txt: {req}"
    assert set(declared()) == set(pins), "pyproject.toml's dependencies and requirements.txt list other packages"
    test_pins = requirements("requirements-test.txt")
    for req in test_pins.values():
        assert next(iter(req.specifier)).operator == "==", f"requirements-test.txt: {req}"
    assert set(declared("test")) == set(test_pins), "the test extra and requirements-test.txt list other packages"


def test_lower_bounds_are_tested_versions():
    pins = {**requirements("requirements-test.txt"), **requirements("requirements.txt")}
    for group in (None, "test", "gpu"):
        for name, req in declared(group).items():
            bound = lower_bound(req)
            assert bound is not None, f"pyproject.toml: {req} has no lower bound"
            tested = {next(iter(pins[name].specifier)).version} if name in pins else set()
            if name in TESTED_ON_THE_GPU_MACHINE:
                tested.add(TESTED_ON_THE_GPU_MACHINE[name])
            assert any(Version(bound) == Version(v) for v in tested), (
                f"pyproject.toml: {req}: the lower bound is not a tested version ({sorted(tested)})")
            assert all(Version(v) in req.specifier for v in tested), f"{req} excludes a tested version {tested}"


def test_the_installed_versions_are_the_pins():
    """What this venv runs is what requirements.txt says (else CI tested something else)."""
    for name, req in requirements("requirements.txt").items():
        installed = importlib.metadata.version(name)
        assert Version(installed).public in req.specifier or Version(installed.split("+")[0]) in req.specifier, (
            name, installed, str(req))
