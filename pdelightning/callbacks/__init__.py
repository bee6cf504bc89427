"""Analysis callbacks that attach to any Lightning run."""

__all__: list[str] = []
