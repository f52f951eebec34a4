"""The one config schema (pydantic v2): TOML files, `--set` overrides, the notebook form and the importers all use it.

Defaults are the values that give good Wan results; each field says what it does beside it.
"""
