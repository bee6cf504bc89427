"""pdelightning: Transformer and PDE models in Lightning, with analysis callbacks (arXiv 2408.09523)."""

__version__ = "0.1.0"
