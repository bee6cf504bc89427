"""``pdelightning-reproduce`` (or ``python -m pdelightning_reproduce``): the reproduction's own command.

pdelightning-reproduce train|analyze|all --out runs/paper ...   # see pdelightning_reproduce.run
pdelightning-reproduce report SOURCE --out docs                  # see pdelightning_reproduce.report
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``report`` to :mod:`.report` and everything else to :mod:`.run`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from pdelightning_reproduce.report import main as report

        return report(argv[1:])
    from pdelightning_reproduce.run import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
