"""Reproduction of arXiv 2408.09523 in three decoupled steps: train, analyse, report.

- :mod:`.settings`: the one table of trained settings, seeds, grids, pairs and checkpoint steps.
- :mod:`.rules`: every verdict rule and measurement constant, fixed before the runs.
- :mod:`.train`, :mod:`.recorder`, :mod:`.pipeline`, :mod:`.run`: ``pdelightning-reproduce train|analyze|all``.
- :mod:`.analyze`, :mod:`.probe`, :mod:`.lens`, :mod:`.measures`: every number, computed afterwards from saved weights
  (captured through the library's adapters and :class:`pdelightning.probing.capture.Capture`).
- :mod:`.summary`: the compact long-format results (committed in ``docs/reproduction/``).
- :mod:`.verdicts`: small-sample intervals (:mod:`.stats`) and the verdict logic; :mod:`.sections`: one module per claim
  section.
- :mod:`.render`, :mod:`.figures`, :mod:`.report`: ``pdelightning-reproduce report`` (Markdown and figures).
- :mod:`.paper`: the paper's own numbers and claims.
"""
