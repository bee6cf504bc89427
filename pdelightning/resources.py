"""The YAML that ships inside the package: experiment configs and callback bundles, reachable by name from anywhere.

The files live in ``pdelightning/configs/`` (experiment configs) and ``pdelightning/configs/callbacks/`` (callback
bundles) and are package data of the wheel. A config argument is resolved in this order:

1. a file that exists at the path given (relative to the working directory) is used as it is, so a user's own
   ``configs/quickstart.yaml`` always wins over ours;
2. otherwise the name is looked up among the packaged files, in any of these spellings::

       configs/quickstart.yaml   quickstart.yaml   quickstart          # an experiment config
       callbacks/all.yaml        callbacks:all                         # a callback bundle

So ``pdelightning fit -c configs/quickstart.yaml -c callbacks/all.yaml`` works in a source checkout and from any
directory of an installed package alike, and ``pdelightning fit -c quickstart -c callbacks:all`` is its short form.
``pdelightning configs`` lists the names.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

CONFIG_ARGS = ("-c", "--config")


class UnknownConfigError(FileNotFoundError):
    """A config name that is neither a file nor one of the packaged configs."""


def config_root() -> Path:
    """The folder of the packaged configs (``pdelightning/configs``)."""
    return Path(str(files("pdelightning").joinpath("configs")))


def packaged_configs() -> dict[str, Path]:
    """Every packaged config by its short name: ``"quickstart"``, ..., ``"callbacks:all"``, ..."""
    root = config_root()
    out = {p.stem: p for p in sorted(root.glob("*.yaml"))}
    out.update({f"callbacks:{p.stem}": p for p in sorted((root / "callbacks").glob("*.yaml"))})
    return out


def _packaged_name(name: str) -> str:
    """The short name that ``name`` spells (``configs/x.yaml``, ``x.yaml``, ``callbacks/y.yaml`` ...)."""
    text = name.replace("\\", "/").strip()
    if text.startswith("./"):
        text = text[2:]
    if text.startswith("configs/"):
        text = text[len("configs/") :]
    if text.startswith("callbacks/"):
        text = "callbacks:" + text[len("callbacks/") :]
    for suffix in (".yaml", ".yml"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


def resolve_config(name: str) -> Path:
    """The file that config argument ``name`` means: the path itself if it exists, else the packaged config.

    Raises:
        UnknownConfigError: naming ``name`` and the packaged names, when it is neither.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    known = packaged_configs()
    found = known.get(_packaged_name(name))
    if found is not None:
        return found
    raise UnknownConfigError(
        f"config {name!r}: no such file, and not one of the configs that ship with pdelightning: "
        f"{', '.join(known)} (run `pdelightning configs` to list them with their paths)"
    )


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``-c NAME`` / ``--config NAME`` / ``--config=NAME`` resolved by :func:`resolve_config`.

    Raises:
        UnknownConfigError: for a name that is neither a file nor a packaged config.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in CONFIG_ARGS and i + 1 < len(out):
            out[i + 1] = str(resolve_config(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
    return out


def list_configs() -> str:
    """The packaged configs, one per line, name then path (``pdelightning configs``)."""
    rows = packaged_configs()
    width = max(map(len, rows)) if rows else 0
    return "\n".join(f"{name:<{width}}  {path}" for name, path in rows.items())
