"""Published tables checked against the derivation modulo the abc-symmetry (mupderive compare)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mupderive.compare import compare, read_table

ROOT = Path(__file__).resolve().parents[1]

# TP-V (Yang et al. 2022) Adam, as width exponents: Table 3 (no multipliers) and Table 8 (readout multiplier 1/fan_in,
# width-independent readout init): the same parameterization in two conventions.
TABLE3 = {"input": {"init_std": "0", "lr": "0"}, "hidden": {"init_std": "-1/2", "lr": "-1"},
          "output": {"multiplier": "0", "init_std": "-1", "lr": "-1"}, "vector": {"init_std": "0", "lr": "0"}}
TABLE8 = {"input": {"init_std": "0", "lr": "0"}, "hidden": {"init_std": "-1/2", "lr": "-1"},
          "output": {"multiplier": "-1", "init_std": "0", "lr": "0"}, "vector": {"init_std": "0", "lr": "0"}}
STANDARD = {"hidden": {"init_std": "-1/2", "lr": "0"}, "output": {"multiplier": "0", "init_std": "-1/2", "lr": "0"}}


def write(tmp_path: Path, layers: dict) -> Path:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"layers": layers}))
    return path


@pytest.mark.parametrize("layers", [TABLE3, TABLE8], ids=["table3", "table8"])
def test_both_tpv_layouts_are_the_derived_parameterization(layers, tmp_path):
    _, entries = compare("adam", read_table(write(tmp_path, layers)))
    assert entries and all(e.agrees for e in entries)


def test_standard_parameterization_is_not(tmp_path):
    _, entries = compare("adam", read_table(write(tmp_path, STANDARD)))
    wrong = {(e.role, e.quantity) for e in entries if not e.agrees}
    assert wrong == {("hidden", "lr"), ("output", "init_std"), ("output", "lr")}
    assert all("too large" in e.note for e in entries if not e.agrees)


def test_sgd_table8_learning_rates(tmp_path):
    """MuSGD's layout: readout multiplier 1/width, readout lr x width, input lr x width."""
    layers = {"input": {"lr": "1"}, "hidden": {"lr": "0"}, "output": {"multiplier": "-1", "lr": "1"}}
    _, entries = compare("sgd", read_table(write(tmp_path, layers)))
    assert all(e.agrees for e in entries)


def test_cli_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "mupderive", "compare", *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT)

    assert run("adam", write(tmp_path, TABLE8)).returncode == 0
    differs = run("adam", write(tmp_path, STANDARD))
    assert differs.returncode == 1 and "DIFFERS" in differs.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": {"hidden": {"lr": "fast"}}}')
    broken = run("adam", bad)
    assert broken.returncode == 2 and "hidden.lr" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
