"""Reproduction of arXiv 2408.09523: the experiment driver (``run``) and the report (``report``)."""
