"""The README stays true: its derived table is what the engine derives, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_derived_table():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- derived-table:start.*?-->\n(.*?)<!-- derived-table:end -->", readme, re.S)
    assert block, "derived-table markers missing"
    fresh = subprocess.run([sys.executable, "scripts/readme_table.py"], capture_output=True, text=True, check=True,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout
    assert block.group(1).strip() == fresh.strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci]


def test_every_function_of_the_rule_language_is_in_the_readme_table():
    from mupderive.language.ir import FUNCTIONS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("| function | meaning |"):]
    block = block[:block.index("\n\n")]
    documented = set(re.findall(r"`([a-z_0-9]+)\(", block))
    assert documented == set(FUNCTIONS), sorted(set(FUNCTIONS) ^ documented)
