"""The built wheel works on its own: installed in a fresh venv, it finds the built-in rules inside the wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = sorted(p.stem for p in (ROOT / "rules").glob("*.toml"))
pytestmark = pytest.mark.slow


def _run(cmd: list[str | Path], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    if importlib.util.find_spec("build") and importlib.util.find_spec("hatchling"):
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, ROOT]
    else:  # pip fetches the build backend into an isolated environment
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", out, ROOT]
    result = _run(cmd, cwd=out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (built,) = out.glob("mupderive-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and only its runtime dependencies."""
    home = tmp_path_factory.mktemp("venv")
    result = _run([sys.executable, "-m", "venv", "--without-pip", home], cwd=home)
    assert result.returncode == 0, result.stderr
    python = home / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile"]
    deps = _run([*pip, *tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]], cwd=home,
                timeout=300)
    if deps.returncode != 0:
        tail = (deps.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"sympy and jinja2 cannot be installed (no network and not in a local index?): {tail}")
    result = _run([*pip, "--no-deps", wheel], cwd=home)
    assert result.returncode == 0, result.stderr
    return home


def test_wheel_contains_rules_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).stem for n in names if n.startswith("mupderive/_data/rules/")) == RULES
    templates = {n.removeprefix("mupderive/_data/templates/") for n in names}
    assert {p.relative_to(ROOT / "templates").as_posix() for p in (ROOT / "templates").rglob("*.j2")} <= templates
    assert "mupderive/cli.py" in names
    assert not any(n.startswith(("tests/", "rules/")) for n in names)


def test_installed_package_is_isolated_from_the_checkout(venv, tmp_path):
    code = "import mupderive, mupderive.resources as r; print(mupderive.__file__); print(r.rules_dir())"
    result = _run([venv / "bin" / "python", "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module, rules = (Path(line) for line in result.stdout.splitlines())
    assert module.is_relative_to(venv) and not module.is_relative_to(ROOT)
    assert rules == module.parent / "_data" / "rules"
    result = _run([venv / "bin" / "python", "-c", "import torch"], cwd=tmp_path)
    assert result.returncode != 0, "the fresh venv must not see the test environment's packages"


def test_installed_cli_lists_the_builtin_rules(venv, tmp_path):
    table = _run([venv / "bin" / "mupderive", "list"], cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == RULES
    listing = _run([venv / "bin" / "mupderive", "list", "--format", "json"], cwd=tmp_path)
    assert [row["name"] for row in json.loads(listing.stdout)] == RULES


def test_installed_cli_derives_adamw(venv, tmp_path):
    result = _run([venv / "bin" / "mupderive", "derive", "adamw", "--format", "json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == "mupderive.derivation/1"
    assert data["rule"] == "adamw"
