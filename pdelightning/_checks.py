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
LINKED_MODEL_ARGS = ("num_classes", "input_kind", "image_size", "vocab_size", "max_len")
"""The attributes every data module exposes that the CLI links into the model's arguments
(``link_arguments(..., apply_on="instantiate")``): written here once, read by the CLI, its error messages, the
resume checks, the callbacks' reference models and the reproduction."""


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
