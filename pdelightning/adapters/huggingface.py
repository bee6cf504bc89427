"""The HuggingFace transformers adapter: encoder, decoder and encoder-decoder ``PreTrainedModel`` s.

Finds the block list of any ``PreTrainedModel`` (BERT, ViT, GPT-2, Llama-style, ModernBERT, T5, BART, ...), the
attention, ``W^O``/``W_V`` and the two sublayer contributions of each block, and switches the model to its eager
attention for a probe. An encoder-decoder model is analysed on its encoder stack, and says once that its decoder is
not.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from pdelightning.adapters.base import (
    FFN_OUT_NAMES,
    MLP_NAMES,
    ModelAdapter,
    attention_like,
    child,
    fastpath_off,
    find_attention,
    linear_weight,
    out_proj_of,
    reset_all,
    value_weight_of,
)
from pdelightning.models.protocol import AnalysisTargets, LayerTarget


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList | nn.Sequential]]:
    """Every ``ModuleList``/``Sequential`` of same-class children that each contain attention and own parameters, by
    name, in module order.
    """
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 1:
            continue
        kids = list(m.children())
        if len({type(k) for k in kids}) != 1 or not any(attention_like(x) for x in kids[0].modules()):
            continue
        if next(kids[0].parameters(), None) is None:
            continue
        found.append((name, m))
    return found


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The block list to analyse: the longest of :func:`_block_lists` (the first of equal ones); in an
    encoder-decoder model (``config.is_encoder_decoder``) the longest one under an ``encoder`` module.
    """
    lists = _block_lists(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        encoders = [(n, m) for n, m in lists if "encoder" in n.split(".")]
        lists = encoders or lists
    best: tuple[str, Any] | None = None
    for name, m in lists:
        if best is None or len(m) > len(best[1]):
            best = (name, m)
    return best


#: ``(model class, analysed stack)`` of the encoder-decoder models already told about (once per process: the
#: reference and null copies some callbacks make are the same model).
_DECLARED: set[tuple[str, str]] = set()


def declare_unanalysed_decoder(adapter: ModelAdapter, analysed: str, n_analysed: int) -> None:
    """Say once (per process and model class) that an encoder-decoder's decoder stack is not analysed."""
    model = adapter.model
    key = (type(model).__qualname__, adapter.name(analysed))
    if key in _DECLARED or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    _DECLARED.add(key)
    others = [(n, m) for n, m in _block_lists(model) if n != analysed and "decoder" in n.split(".")]
    if not others:
        return
    name, blocks = others[0]
    rank_zero_warn(
        f"pdelightning: {type(model).__name__} is an encoder-decoder model: its encoder stack "
        f"({adapter.name(analysed)}, {n_analysed} layers) is analysed; its decoder stack "
        f"({adapter.name(name)}, {len(blocks)} layers: causal self-attention and cross-attention to the encoder) "
        "is NOT analysed: the callbacks read one chain of layers over one token sequence, and the decoder runs over "
        "other tokens (its cross-attention is never analysed)."
    )


def sublayers(block: nn.Module, attn: nn.Module | None) -> tuple[nn.Module | None, nn.Module | None]:
    """``(attn_out, mlp_out)``: the modules whose outputs are the two sublayers' contributions to the stream.

    Only modules that run forward: in T5 the sublayers sit in a ``ModuleList`` (``block.layer``) whose wrappers
    return the residual sum, so the contributions are the attention module's own output and ``DenseReluDense``'s.
    ``None`` where a contribution is not found (the callbacks then say so and leave that term out).
    """
    top_attn = next((c for c in block.children() if attn is not None and any(m is attn for m in c.modules())), None)
    if isinstance(top_attn, (nn.ModuleList, nn.ModuleDict)):  # T5: [SelfAttention, (cross-attention,) FF]
        last = list(top_attn.children())[-1]
        return attn, child(last, "DenseReluDense", *MLP_NAMES)
    out = child(top_attn, "output") if top_attn is not None else None
    if out is not None and child(out, "dense") is not None:  # BERT-style post-LN: dense -> dropout -> LN(x + .)
        ffn_out = child(block, "output")
        return child(out, "dense"), (child(ffn_out, "dense") if ffn_out is not None else None)
    mlp = child(block, *MLP_NAMES)
    return top_attn, mlp if mlp is not None else child(block, *FFN_OUT_NAMES)


class HuggingFaceAdapter(ModelAdapter):
    """HuggingFace ``PreTrainedModel`` s: BERT/RoBERTa (``encoder.layer``), ViT (``layers``), GPT-2 (``h``), Llama-style
    (``model.layers`` with ``self_attn``/``o_proj``), ModernBERT (``attn.Wo``), T5 (``encoder.block``, ``o``), BART
    (``encoder.layers``, ``fc2``), and any other model whose blocks form a list of same-class modules containing
    attention. Layers are named by their real module path.

    Encoder-decoder models (``config.is_encoder_decoder``: T5, BART, ...) are analysed on their encoder stack; the
    decoder stack is declared not analysed, once (:func:`declare_unanalysed_decoder`). In T5 the sublayers are the
    attention module's own output and ``DenseReluDense`` (``block.layer`` is a ``ModuleList`` that never runs
    forward); in BART-style blocks with no MLP module the feed-forward contribution is ``fc2``'s output.

    For every probe forward the model is switched to the ``"eager"`` attention implementation (through
    ``set_attn_implementation`` or the config), whose attention modules return their probabilities as the last
    output (causal and padding masks applied by the library itself), and switched back afterwards; every probe
    thus takes one numerical path, whichever callbacks share it. ``u_0`` is the first
    block's input (token + position embeddings, the class token of ViT included); ViT's class token is counted as a
    prefix token. Re-initialisation uses the model's own ``_init_weights``.
    """

    family = "huggingface"
    priority = 80

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        transformers = sys.modules.get("transformers")  # a HuggingFace model means transformers is imported already
        if transformers is None:
            return False
        return isinstance(module, transformers.PreTrainedModel) and _block_list(module) is not None

    def targets(self) -> AnalysisTargets:
        found = _block_list(self.model)
        assert found is not None
        list_name, blocks = found
        declare_unanalysed_decoder(self, list_name, len(blocks))
        layers = []
        for key, block in blocks.named_children():  # the real path: named_modules() gives the same names
            attn = find_attention(block)
            proj = out_proj_of(attn, block) if attn is not None else None
            attn_out, mlp_out = sublayers(block, attn)
            layers.append(
                LayerTarget(
                    name=self.name(f"{list_name}.{key}"),
                    module=block,
                    attention=attn,
                    out_proj=proj,
                    block=block,
                    attn_out=attn_out,
                    mlp_out=mlp_out,
                    w_o=(lambda p: lambda: linear_weight(p))(proj) if proj is not None else None,
                    w_v=value_weight_of(attn) if attn is not None else None,
                )
            )
        prefix = 1 if type(self.model).__name__.startswith(("ViT", "DeiT", "BeiT", "Dinov2")) else 0
        first = blocks[0] if len(blocks) else None
        return AnalysisTargets(
            layers=layers, embedding=first, embedding_is_input=True, n_prefix_tokens=prefix, family=self.family
        )

    @contextlib.contextmanager
    def probe_mode(self, attention: bool = False) -> Iterator[None]:
        with fastpath_off():
            config = getattr(self.model, "config", None)
            was = getattr(config, "_attn_implementation", None)
            if was in (None, "eager"):
                yield
                return
            setter = getattr(self.model, "set_attn_implementation", None)
            try:
                if callable(setter):
                    setter("eager")
                else:
                    config._attn_implementation = "eager"  # type: ignore[union-attr]
                yield
            finally:
                if callable(setter):
                    setter(was)
                else:
                    config._attn_implementation = was  # type: ignore[union-attr]

    def reinitialise(self, model: nn.Module) -> bool:
        for m in model.modules():
            if hasattr(m, "_is_hf_initialized"):
                m._is_hf_initialized = False
        for p in list(model.parameters()) + list(model.buffers()):
            if hasattr(p, "_is_hf_initialized"):
                p._is_hf_initialized = False
        init = getattr(model, "init_weights", None)
        if not callable(init):
            return reset_all(model) > 0
        init()
        return True
