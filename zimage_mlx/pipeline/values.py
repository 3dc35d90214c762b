"""One parameter's value checked alone (its type and range), as `RequestError`s naming it; the rules between
parameters and against the model are GenerationRequest.validate's (request.py)."""

from __future__ import annotations

import math

import numpy as np


class RequestError(ValueError):
    """A parameter of a generation request is invalid; `field` names it. A rule "field needs another parameter"
    also names that one (`needs`) and the one whose presence asks for it (`given`), so that each interface can
    say it with its own spelling of the parameters (the CLI's options: apps/generate_cmd.py)."""

    def __init__(self, field: str, message: str, needs: str | None = None, given: str | None = None):
        super().__init__(message)
        self.field, self.needs, self.given = field, needs, given


def int_arg(name: str, value, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RequestError(name, f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(name, f"{name} must be {bound}, got {value}")
    return int(value)


def is_finite_number(value) -> bool:
    """A number (not a bool) with a finite float value: NaN, ±inf and integers beyond the float range are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def float_arg(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if not is_finite_number(value):
        raise RequestError(name, f"{name} must be a finite number, got {str(value)[:40]}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(name, f"{name} must be between {low} and {high}, got {value}")
    return float(value)


def prompts_arg(name: str, value) -> list[str]:
    """A string or a non-empty list of strings, each valid Unicode (a lone surrogate cannot be tokenized)."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, (list, tuple)) and not value:
        raise RequestError(name, f"{name} is an empty list; give at least one prompt")
    elif not (isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)):
        raise RequestError(name, f"{name} must be a string or a list of strings, got {type(value).__name__}")
    for p in value:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(name, f"{name} is not valid Unicode: a lone surrogate {p[e.start]!r} at character "
                               f"{e.start}") from None
    return list(value)
