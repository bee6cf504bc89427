"""Argument checks shared by the models, data modules, analysis functions and callbacks."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming it and listing them.

    Example::

        >>> check_choice("mode", "input", ("input", "embedding"))
        'input'
        >>> check_choice("mode", "inptu", ("input", "embedding"))
        Traceback (most recent call last):
        ...
        ValueError: mode='inptu' is not one of ('input', 'embedding')
    """
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")
    return value
