"""Error messages of the command line: the bad value, the valid choices, and the root cause on the last line.

jsonargparse reports a failed value with every alternative it tried (``Expected a <class 'NoneType'>``,
the subclass boilerplate, ``Given value: Namespace(...)``). :func:`clarify_parse_error` turns that into
one line naming the key, the value and what would be accepted; a misspelt class or argument name gets
the closest valid names (``difflib``). :func:`check_config_files` reads each ``-c/--config`` file first,
so a YAML syntax error names its file and line.
"""

from __future__ import annotations

import collections.abc
import difflib
import errno
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from pdelightning._checks import LINKED_MODEL_ARGS
from pdelightning.trust import init_arguments
from pdelightning.utils import InputError

TOP_LEVEL_KEYS = ("seed_everything", "trainer", "model", "data", "ckpt_path", "optimizer", "lr_scheduler", "config")
"""The sections a ``pdelightning fit`` config may have."""
_SUBCLASS_NOISE = (
    "Not a valid subclass of",
    "Subclass types expect one of",
    "- a class path (str)",
    "- a dict with class_path entry",
    "- a dict without class_path but with init_args entry",
    "- a dict with parameters accepted by the base class",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
)


class ConfigFileError(InputError):
    """A ``-c/--config`` file cannot be read as a YAML mapping."""


def check_config_files(argv: Sequence[str]) -> None:
    """Parse every ``-c FILE`` / ``--config FILE`` / ``--config=FILE`` of ``argv`` as YAML.

    Raises:
        ConfigFileError: naming the file, line and column of a syntax error, or the file whose top level
            is not a mapping of sections.
    """
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            continue
        path = Path(name)
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            context = getattr(err, "context", None)
            detail = f"{problem} ({context})" if context else problem
            raise ConfigFileError(f"YAML syntax error in {path}{where}: {detail}") from err
        except UnicodeDecodeError as err:
            raise ConfigFileError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
        if content is None:
            raise ConfigFileError(
                f"config file {path} is empty (or only comments); give it keys among "
                f"{', '.join(TOP_LEVEL_KEYS[:4])}, or leave out -c {name}"
            )
        if not isinstance(content, dict):
            raise ConfigFileError(
                f"config file {path} holds a {type(content).__name__}, not a mapping of sections; "
                f"its top level should be keys among {', '.join(TOP_LEVEL_KEYS[:4])}"
            )


# ---- class names ---------------------------------------------------------------------------------------
def _subclasses(base: type) -> list[type]:
    seen: dict[type, None] = {}
    stack = [base]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen[sub] = None
                stack.append(sub)
    return [c for c in seen if not c.__name__.startswith("_") and not c.__module__.startswith(("_", "tests"))]


def _base_classes(hint: Any) -> list[type]:
    """The classes a type hint accepts subclasses of (through ``Optional``, ``Union``, lists and ``Callable``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) or (origin is not None and args and origin is not type):
        if origin is collections.abc.Callable:
            return _base_classes(args[-1]) if args else []
        return [c for a in args for c in _base_classes(a)]
    if isinstance(hint, type) and hint.__module__ != "builtins":
        return [hint]
    return []


def class_choices(bases: Iterable[type]) -> list[type]:
    """Importable subclasses of ``bases`` (and the bases themselves), without private ones."""
    out: dict[type, None] = {}
    for base in bases:
        if base.__module__ != "builtins" and not inspect.isabstract(base):
            out[base] = None
        out.update(dict.fromkeys(_subclasses(base)))
    return list(out)


def _public_path(cls: type) -> str:
    """``cls``'s import path through its package's top-level re-export when there is one."""
    module = cls.__module__
    parts = module.split(".")
    for i in range(1, len(parts)):
        parent = sys.modules.get(".".join(parts[:i]))
        if parent is not None and getattr(parent, cls.__name__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__name__}"
    return f"{module}.{cls.__name__}"


def suggest_class(bad: str, choices: Sequence[type], n: int = 3) -> list[str]:
    """The names of ``choices`` closest to ``bad`` (a short name or a dotted path), best first."""
    short = bad.rpartition(".")[2]
    names = sorted({c.__name__ for c in choices})
    lowered = {name.lower(): name for name in names}  # case-insensitive: "mnistdatamodule" is MNISTDataModule
    best = [lowered[m] for m in difflib.get_close_matches(short.lower(), list(lowered), n=n, cutoff=0.6)]
    if "." in bad:
        paths = {c.__name__: _public_path(c) for c in choices}
        return [paths[b] for b in best]
    return best


def _listing(choices: Sequence[type], bases: Sequence[type], key: str | None) -> str:
    base_names = " / ".join(dict.fromkeys(b.__name__ for b in bases))
    ours = _ours(choices, key)
    if ours:
        return f"classes here: {', '.join(ours)}" + (f" (or any {base_names} by import path)" if base_names else "")
    names = sorted({c.__name__ for c in choices})
    if len(names) <= 25:
        return f"valid: {', '.join(names)}"
    return f"any {base_names} subclass by name or import path ({len(names)} are loaded)"


def _parsers(parser: Any) -> list[Any]:
    """``parser`` and its subcommand parsers."""
    found = [parser] if parser is not None else []
    for action in getattr(parser, "_actions", []):
        if isinstance(getattr(action, "choices", None), dict):
            found += [p for p in action.choices.values() if hasattr(p, "_option_string_actions")]
    return found


def _help_hint(option: str) -> str:
    section = option.lstrip("-").split(".")[0]
    return f"pdelightning fit --help (or --{section}.help CLASS for a class's arguments)"


def _find_action(parser: Any, key: str) -> Any:
    for action in getattr(parser, "_actions", []):
        if getattr(action, "dest", None) == key:
            return action
    for action in getattr(parser, "_actions", []):  # subcommands: look inside each subparser
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action.choices, dict) else []:
            found = _find_action(sub, key)
            if found is not None:
                return found
    return None


def _init_args(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        followed = init_arguments(cls) if isinstance(cls, type) else None  # with the base's, via **kwargs
        if followed is not None:
            return followed
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


# ---- parse errors --------------------------------------------------------------------------------------
_KEY_RE = re.compile(r'Parser key "([^"]+)"')
_PROBLEM_RE = re.compile(r"^(?P<indent>[ \t]*)(?:- )?Problem with given class_path '(?P<cp>[^']+)':[ \t]*$", re.M)
_CLASS_RES = (
    re.compile(r"Expected a dot import path string: (?P<bad>\S+)"),
    re.compile(r"Problem with given class_path '(?P<bad>[^']+)':\s*\n\s*module '[^']+' has no attribute '[^']+'"),
    re.compile(r"module '(?P<mod>[\w.]+)' has no attribute '(?P<attr>\w+)'"),
    re.compile(r"Import path (?P<bad>\S+) does not correspond to a subclass of"),
    re.compile(r"No module named '(?P<mod>[\w.]+)'"),
)
_OPTION_RE = re.compile(
    r"Problem with given class_path '(?P<cp>[^']+)':\s*\n\s*Option '(?P<opt>[^']+)' is not accepted"
)
_UNRECOGNIZED_RE = re.compile(r"unrecognized arguments: (?P<opt>--\S+)")
_SUBCOMMAND_OPTION_RE = re.compile(r"Subcommand '(?P<sub>\w+)' does not accept option '(?P<opt>[^']+)'")
_LITERAL_RE = re.compile(r"Expected a typing\.Literal\[(?P<choices>.*?)\]\.? Got value: (?P<bad>.*)")
_SIMPLE_TYPE_RE = re.compile(r"Expected a <class '(?:\w+\.)*(?P<t>\w+)'>\.? Got value: (?P<bad>.*)")
_GIVEN_RE = re.compile(r"^\s*Given value: (?P<given>.*)$", re.M)
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "dict": "a mapping",
}
_TYPE_RE = re.compile(r"- Expected a <class '(?:\w+\.)*(?P<t>\w+)'>")
# The classes a key accepts must take these arguments (the CLI links them from the data module).
_REQUIRED_ARGS = {"model.model": LINKED_MODEL_ARGS}


def _exported(cls: type) -> bool:
    """Whether ``cls`` is in the ``__all__`` of the package that re-exports it (its public name)."""
    module = sys.modules.get(_public_path(cls).rpartition(".")[0])
    return module is not None and cls.__name__ in getattr(module, "__all__", ())


def _ours(choices: Sequence[type], key: str | None) -> list[str]:
    """The project's own classes among ``choices`` that a user would pick: exported, not a base of another."""
    required = _REQUIRED_ARGS.get(key or "", ())
    out = []
    for c in choices:
        if not c.__module__.startswith("pdelightning") or not _exported(c):
            continue
        if any(o is not c and issubclass(o, c) for o in choices):
            continue
        if required and not set(required) <= set(_init_args(f"{c.__module__}.{c.__qualname__}")):
            continue
        out.append(c.__name__)
    return sorted(set(out))


def _nested_block(message: str) -> tuple[str, str] | None:
    """``(class path, dedented text)`` of the first ``Problem with given class_path '...':`` block."""
    m = _PROBLEM_RE.search(message)
    if not m:
        return None
    depth = len(m["indent"]) + (2 if message[m.start() :].lstrip().startswith("-") else 0)
    lines = []
    for line in message[m.end() :].splitlines()[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= depth:
            break
        lines.append(line)
    return m["cp"], textwrap.dedent("\n".join(lines)).strip()


def _root_cause(message: str, parser: Any, key: str | None = None) -> str | None:
    keys = _KEY_RE.findall(message)
    key = keys[0] if keys else key
    given = _GIVEN_RE.search(message)
    given_value = given["given"].strip() if given else None

    m = _OPTION_RE.search(message)
    if m:
        args = _init_args(m["cp"])
        name = m["cp"].rpartition(".")[2]
        close = difflib.get_close_matches(m["opt"], args, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        where = f"{key}: " if key else ""
        return f"{where}{name} has no argument {m['opt']!r}; {hint}its arguments: {', '.join(args)}"
    m = _UNRECOGNIZED_RE.search(message)
    if m:
        options = sorted({o for p in _parsers(parser) for o in getattr(p, "_option_string_actions", {})})
        bad = m["opt"].split("=", 1)[0]
        close = difflib.get_close_matches(bad, options, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; see {_help_hint(bad)}"
        return f"unknown option {bad}{hint}"
    m = _SUBCOMMAND_OPTION_RE.search(message)
    if m:
        first = m["opt"].split(".")[0]
        close = difflib.get_close_matches(first, TOP_LEVEL_KEYS, n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return f"'{m['sub']}' does not accept the key {m['opt']!r}; {hint}the sections are: {', '.join(TOP_LEVEL_KEYS)}"
    for pattern in _CLASS_RES:
        m = pattern.search(message)
        if not m:
            continue
        groups = m.groupdict()
        bad = groups.get("bad") or (f"{groups['mod']}.{groups['attr']}" if groups.get("attr") else groups["mod"])
        action = _find_action(parser, key) if key else None
        bases = _base_classes(getattr(action, "_typehint", None)) if action is not None else []
        choices = class_choices(bases)
        close = suggest_class(bad, choices) if choices else []
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"{key or 'value'}: no class named {bad!r}; {hint}{_listing(choices, bases, key)}".rstrip("; ")
    nested = _nested_block(message)
    if nested is not None:
        class_path, block = nested
        inner = _root_cause(block, None) or (block if "\n" not in block else None)
        if inner:
            return f"{key or 'value'} ({class_path.rpartition('.')[2]}): {inner}"
    m = _LITERAL_RE.search(message)
    if m:
        return f"{key or 'value'}={m['bad'].strip()!r} is not one of [{m['choices']}]"
    m = _SIMPLE_TYPE_RE.search(message)
    if m:
        wanted = _TYPE_NAMES.get(m["t"], f"a {m['t']}")
        return f"{key or 'value'}={m['bad'].strip()!r} is not valid: expected {wanted}"
    if key and given_value is not None and "Does not validate against any of the Union subtypes" in message:
        literals = re.findall(r"Expected a typing\.Literal\[(.*?)\]", message)
        types_ = [t for t in _TYPE_RE.findall(message) if t != "NoneType"]
        wanted = [f"one of [{lit}]" for lit in literals] + [_TYPE_NAMES.get(t, f"a {t}") for t in dict.fromkeys(types_)]
        if "- Expected a <class 'NoneType'>" in message:
            wanted.append("null")
        if wanted and not given_value.startswith(("Namespace(", "NestedArg(", "[", "{")):
            return f"{key}={given_value!r} is not valid: expected " + " or ".join(wanted)
    return None


def clarify_parse_error(message: str, parser: Any = None) -> str:
    r"""Clean up jsonargparse's ``message``: noise removed, the root cause (value, choices) on the last line.

    Example::

        >>> msg = "\n".join([
        ...     'Parser key "trainer.max_epochs":', "  Does not validate against any of the Union subtypes",
        ...     "  Errors:", "    - Expected a <class 'int'>", "    - Expected a <class 'NoneType'>",
        ...     "  Given value type: <class 'str'>", "  Given value: abc"])
        >>> clarify_parse_error(msg)
        "trainer.max_epochs='abc' is not valid: expected an integer or null"
    """
    try:
        root = _root_cause(message, parser)
    except Exception:  # never let the message helper hide the original error
        root = None
    if root is not None:
        return root
    kept = []
    for line in message.splitlines():
        stripped = line.strip()
        if stripped.startswith(_SUBCLASS_NOISE) or re.match(r"- Expected a path but .* not accessible", stripped):
            continue
        if stripped.startswith("Given value:") and re.search(r"Namespace\(|NestedArg\(", stripped):
            continue
        kept.append(line)
    return "\n".join(kept).strip()


def trainer_message(err: BaseException, config: Any) -> str | None:
    """One line for Lightning refusing the trainer's accelerator or devices, naming the value and the fix, or
    ``None`` when ``err`` is something else.

    Example::

        >>> trainer_message(Exception("No supported gpu backend found!"), {"accelerator": "gpu"})
        "trainer.accelerator='gpu' needs a GPU, but this machine has none that torch can use; use --trainer.accelerator cpu (or auto: a GPU when there is one)"
    """  # noqa: E501
    text = str(err).strip()
    get = config.get if hasattr(config, "get") else lambda key, default=None: default
    accelerator, devices = get("accelerator", "auto"), get("devices", "auto")
    no_device = ("No supported gpu backend found", "can not run on your system since the accelerator is not available")
    if any(s in text for s in no_device):
        return (
            f"trainer.accelerator={accelerator!r} needs a GPU, but this machine has none that torch can use; "
            "use --trainer.accelerator cpu (or auto: a GPU when there is one)"
        )
    if "devices" in text:
        return (
            f"trainer.devices={devices!r} is not valid with accelerator {accelerator!r}: give a positive count "
            "(e.g. --trainer.devices 1), a list of device indices, -1 (all) or auto"
        )
    return None


def check_trainer_values(config: Any) -> None:
    """Refuse trainer values Lightning accepts but that fail later or make no sense, before anything is built.

    Raises:
        InputError: for ``val_check_interval <= 0`` (a division by zero in the loop) and a negative
            ``gradient_clip_val`` (clipping to a negative norm).
    """
    get = config.get if hasattr(config, "get") else lambda key, default=None: default
    vci = get("val_check_interval", None)
    if isinstance(vci, (int, float)) and not isinstance(vci, bool) and vci <= 0:
        raise InputError(
            f"trainer.val_check_interval={vci!r} must be > 0: a fraction of an epoch in (0, 1] or a number of "
            "training batches >= 1 (e.g. --trainer.val_check_interval 1.0)"
        )
    clip = get("gradient_clip_val", None)
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip < 0:
        raise InputError(
            f"trainer.gradient_clip_val={clip!r} must be >= 0 (a gradient norm or value bound); 0 or null turns "
            "clipping off"
        )


_STORAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
_SAVE_DIR = "--trainer.logger.init_args.save_dir DIR"


def storage_message(err: BaseException) -> str | None:
    """One line for a write the machine refused (read-only or not permitted, disk full), naming the place and the
    fix, or ``None`` when ``err`` (and its causes) is something else.

    Example::

        >>> storage_message(PermissionError(errno.EACCES, "Permission denied", "/logs/run"))
        'cannot write to /logs/run: Permission denied; choose a writable folder with --trainer.logger.init_args.save_dir DIR'
    """  # noqa: E501
    link: BaseException | None = err
    seen: list[BaseException] = []
    while link is not None and link not in seen:
        seen.append(link)
        if isinstance(link, OSError) and link.errno in _STORAGE_ERRNOS:
            where = link.filename or "the run's folder"
            if link.errno in (errno.ENOSPC, errno.EDQUOT):
                return (
                    f"cannot write to {where}: {link.strerror or 'No space left on device'}; free space on that disk "
                    f"or write elsewhere with {_SAVE_DIR}"
                )
            return f"cannot write to {where}: {link.strerror}; choose a writable folder with {_SAVE_DIR}"
        if "No space left on device" in str(link):
            return f"cannot write the run's files: No space left on device; free space or write elsewhere ({_SAVE_DIR})"
        link = link.__cause__ or link.__context__
    return None


def instantiation_message(err: BaseException) -> str:
    """One line for an exception raised while building the configured objects: which class, what type, what."""
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain:  # jsonargparse re-raises: the class is in the first error
        chain.append(link)
        link = link.__cause__ or link.__context__
    where = None
    for exc in reversed(chain):
        tb = exc.__traceback__
        while tb is not None and where is None:
            frame = tb.tb_frame
            obj = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
            if obj is not None and not any(c.__name__ == "LightningCLI" for c in type(obj).__mro__):
                where = type(obj).__name__
            tb = tb.tb_next
        if where is not None:
            break
    prefix = f"building {where}: " if where else "building the configured objects: "
    return f"{prefix}{type(err).__name__}: {_union_error_cause(str(err).strip()) or type(err).__name__}"


def _union_error_cause(text: str) -> str:
    r"""The one real error of jsonargparse's "Does not validate against any of the Union subtypes" report.

    Example::

        >>> _union_error_cause("Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
        ...     "  - batch_size=0 must be positive\n  - Expected a <class 'NoneType'>\nGiven value: Namespace()")
        'batch_size=0 must be positive'
    """
    if "Does not validate against any of the Union subtypes" not in text or "\nErrors:" not in text:
        return text
    body = text.split("\nErrors:", 1)[1].split("\nGiven value", 1)[0]
    entries = [e.strip() for e in re.split(r"\n\s*- ", "\n" + body) if e.strip()]
    noise = tuple(n.removeprefix("- ") for n in _SUBCLASS_NOISE)
    real = [e for e in entries if not re.fullmatch(r"Expected a <class '[\w.]+'>", e) and not e.startswith(noise)]
    return " ".join(real[0].split()) if len(real) == 1 else text
