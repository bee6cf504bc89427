"""Model adapters: where the layers, the attention and the embedding are in any model, and how to probe it.

One adapter per family, each recognised from the model's module types or structure (see
:mod:`pdelightning.adapters.families`): our models and any model implementing ``analysis_targets()``,
TransformerLens, HuggingFace transformers, timm Vision Transformers, Swin Transformers (timm and HuggingFace:
windowed attention in stages, :mod:`pdelightning.adapters.windowed`), PyTorch's ``nn.TransformerEncoder`` /
``nn.TransformerDecoder``, and a generic fallback that finds the repeated block list of a custom Transformer.
Every analysis callback goes through this layer; register your own family with :func:`register_adapter`.
"""

from pdelightning.adapters.base import ModelAdapter, linear_weight
from pdelightning.adapters.families import (
    GenericAdapter,
    HuggingFaceAdapter,
    ProtocolAdapter,
    TimmAdapter,
    TorchTransformerAdapter,
    TransformerLensAdapter,
)
from pdelightning.adapters.readers import attention_reader, reader_kind, sdpa_probabilities
from pdelightning.adapters.registry import (
    TargetNotFoundError,
    find_adapter,
    register_adapter,
    registered_adapters,
    resolve,
)
from pdelightning.adapters.windowed import SwinAdapter

__all__ = [
    "GenericAdapter",
    "HuggingFaceAdapter",
    "ModelAdapter",
    "ProtocolAdapter",
    "SwinAdapter",
    "TargetNotFoundError",
    "TimmAdapter",
    "TorchTransformerAdapter",
    "TransformerLensAdapter",
    "attention_reader",
    "find_adapter",
    "linear_weight",
    "reader_kind",
    "register_adapter",
    "registered_adapters",
    "resolve",
    "sdpa_probabilities",
]
