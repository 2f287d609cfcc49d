"""The depth measurement: real optimizers on residual stacks of several depths against the depth derivation."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import pytest

from mupderive.verify.depth_stack import run_depth_oracle

DEPTHS = (2, 4, 8, 16)


@pytest.fixture(scope="module")
def adamw():
    return run_depth_oracle("adamw", DEPTHS, seeds=1)


@pytest.mark.parametrize("rule", ["sgd", "muon"])
def test_derived_depth_factors_pass_on_the_real_class(rule):
    report = run_depth_oracle(rule, DEPTHS, seeds=1)
    assert report.passed, report.to_json()
    assert abs(report.check("branch change").fit.slope + 1) < 0.2


def test_adamw_branch_updates_are_one_over_depth(adamw):
    assert adamw.passed
    assert abs(adamw.check("branch change").fit.slope + 1) < 0.15
    assert abs(adamw.check("stream change").fit.slope) < 0.25
    assert any(n.startswith("eps: base") for n in adamw.notes)  # eps calibrated into its balance point


def test_width_only_is_a_negative_control(adamw):
    """Without the depth factors each branch moves by Theta(1) and the stream by ~L: far from the derived targets."""
    assert adamw.check("branch change", "width-only").fit.slope > -0.3
    assert adamw.check("stream change", "width-only").fit.slope > 0.7


def test_alpha_half_on_two_matrix_branches_is_lazy(adamw):
    """Depth-muP's alpha = 1/2 with K = 2: first order still L^-1, the joint term L^-3/2 (CompleteP's point)."""
    check = adamw.check("joint change", "alpha=1/2")
    assert check.predicted == Fraction(-3, 2) and abs(check.fit.slope + 1.5) < 0.3


def test_cli_rejects_bad_depths():
    out = subprocess.run([sys.executable, "-m", "mupderive", "oracle", "adamw", "--depths", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1
