"""The package layering holds: a lower package never imports a higher one.

engine ← protos ← kvtransfer ← prefill_svc / decode_svc; the gateway uses engine + protos only;
pdserve (command line, launcher, load tools) sits on top. Every import is counted, also those inside
functions and under ``TYPE_CHECKING``: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "protos", "kvtransfer", "prefill_svc", "decode_svc", "gateway", "pdserve", "bench")
ALLOWED = {
    "engine": set(),
    "protos": {"engine"},
    "kvtransfer": {"engine", "protos"},
    "prefill_svc": {"engine", "protos", "kvtransfer"},
    "decode_svc": {"engine", "protos", "kvtransfer"},
    "gateway": {"engine", "protos"},
    "pdserve": {"engine", "protos", "kvtransfer", "prefill_svc", "decode_svc", "gateway"},
    "bench": {"engine", "protos", "kvtransfer", "prefill_svc", "decode_svc", "gateway", "pdserve"},
}


def imported_packages(path: Path) -> set[str]:
    """The project's top-level packages a module imports (absolute imports; relative ones stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def violations(root: Path) -> list[str]:
    out = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for target in sorted(imported_packages(path) - allowed - {package}):
                out.append(f"{path.relative_to(root)} imports {target}")
    return out


def test_no_package_imports_one_above_it():
    assert violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "engine" / "bad.py").write_text("def f():\n    from gateway.http import create_app\n")
    (tmp_path / "gateway" / "bad.py").write_text("import kvtransfer.tcp\n")
    (tmp_path / "protos" / "ok.py").write_text("from engine.config import EngineConfig\n")
    assert violations(tmp_path) == ["engine/bad.py imports gateway", "gateway/bad.py imports kvtransfer"]


def test_lab_scripts_are_not_installed():
    """``bench/`` runs from a checkout (``python -m bench.x``); the distribution installs pdserve's
    packages only."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.split("*")[0] for p in include["include"]} == set(PACKAGES) - {"bench"}
