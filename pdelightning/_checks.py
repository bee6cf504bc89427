"""Argument checks, and the argument choices, shared by the models, data modules, analysis functions and callbacks."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, TypeVar

T = TypeVar("T")

# What a batch holds, shared by the models (how they embed it) and the data modules (what they produce): the two
# never import each other, so the choice lives here, below both.
InputKind = Literal["image", "tokens"]
INPUT_KINDS = ("image", "tokens")
# How an image becomes tokens (the models' embedding).
Tokenization = Literal["rows", "patches"]
TOKENIZATIONS = ("rows", "patches")


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
