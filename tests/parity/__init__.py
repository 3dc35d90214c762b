"""Torch parity tier (a package so its conftest does not shadow tests/conftest.py's `conftest` module)."""
