"""Verification of derived muP rules: reference models, training data, coordinate checks, LR sweeps."""
