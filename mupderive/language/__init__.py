"""The rule language: TOML rule files with Python-like expressions, parsed into a checked IR."""
