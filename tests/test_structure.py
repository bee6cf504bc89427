"""The house rules that keep the package readable, checked on the tree itself (issue 19).

- the formatter is not switched off to meet the size caps: at most 10 ``# fmt: skip`` in the two packages;
- no module over 500 lines, no callback module over 350 (callbacks are thin adapters);
- README's layout section names every sub-package and only paths that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers.configs import ROOT

PACKAGES = ("pdelightning", "pdelightning_reproduce")
MAX_FMT_SKIP = 10
MAX_LINES = 500
MAX_CALLBACK_LINES = 350


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_the_formatter_is_not_switched_off():
    skips = {p.relative_to(ROOT): p.read_text().count("# fmt: skip") for p in _modules()}
    skips = {p: n for p, n in skips.items() if n}
    assert sum(skips.values()) <= MAX_FMT_SKIP, f"{sum(skips.values())} `# fmt: skip` (at most {MAX_FMT_SKIP}): {skips}"
    offs = [p.relative_to(ROOT) for p in _modules() if "# fmt: off" in p.read_text()]
    assert not offs, f"`# fmt: off` in {offs}"


def test_no_module_is_over_its_cap():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := _lines(p)) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    callbacks = ROOT / "pdelightning" / "callbacks"
    fat = {p.name: n for p in callbacks.glob("*.py") if (n := _lines(p)) > MAX_CALLBACK_LINES}
    assert not fat, f"callback modules over {MAX_CALLBACK_LINES} lines (move the math to pdelightning.analysis): {fat}"


def _layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1).splitlines()


def _layout_paths() -> list[Path]:
    """The paths the layout names: a top-level entry, or an entry indented under the last top-level folder."""
    paths, parent = [], Path()
    for line in _layout_block():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, names = len(match.group(1)), match.group(2)
        for name in names.rstrip(",").split(","):
            name = name.strip()
            if not name or not re.match(r"^[\w./-]+$", name):
                continue
            path = (parent / name) if indent else Path(name)
            paths.append(path)
        if not indent:
            parent = Path(names.rstrip("/"))
    return paths


def test_the_readme_layout_matches_the_tree():
    named = _layout_paths()
    missing = [str(p) for p in named if not (ROOT / p).exists()]
    assert not missing, f"README's layout names paths that do not exist: {missing}"
    named_set = {p.as_posix().rstrip("/") for p in named}
    for package in PACKAGES:
        assert package in named_set, f"README's layout does not name {package}/"
    subpackages = sorted(p.parent.name for p in (ROOT / "pdelightning").glob("*/__init__.py"))
    unnamed = [s for s in subpackages if f"pdelightning/{s}" not in named_set]
    assert not unnamed, f"README's layout does not name these sub-packages of pdelightning: {unnamed}"
