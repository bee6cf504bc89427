"""Tiny encoder-decoder and other non-matrix families (T5, BART, ModernBERT, torchvision ViT), from configs with
random init (nothing downloaded), in the LightningModules a user would write, with the library's own attention maps.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tests.helpers.zoo import IMG, NUM_CLASSES, SEQ, VOCAB, DictDataset, HFModule, TupleDataset, TupleModule, _tokens

ENCDEC_FAMILIES = ("t5_encoder", "t5", "bart", "modernbert", "torchvision_vit")


class T5EncoderClassifier(L.LightningModule):
    """A user's classifier around ``T5EncoderModel``: masked mean pool, linear head, dict batches."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.model = encoder
        self.head = nn.Linear(encoder.config.d_model, NUM_CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def t5_config(**extra: Any) -> Any:
    import transformers as tr

    tr.logging.set_verbosity_error()
    return tr.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=1,
        **extra,
    )


def hf_model(kind: str) -> nn.Module:
    """The bare HuggingFace model of ``kind`` (``t5_encoder``, ``t5``, ``bart``, ``modernbert``)."""
    import transformers as tr

    tr.logging.set_verbosity_error()
    if kind == "t5_encoder":
        return tr.T5EncoderModel(t5_config())
    if kind == "t5":
        return tr.T5ForSequenceClassification(t5_config(num_labels=NUM_CLASSES))
    if kind == "bart":
        cfg = tr.BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=SEQ + 2,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            num_labels=NUM_CLASSES,
        )
        return tr.BartForSequenceClassification(cfg)
    if kind == "modernbert":
        cfg = tr.ModernBertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SEQ,
            local_attention=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            num_labels=NUM_CLASSES,
        )
        return tr.ModernBertForSequenceClassification(cfg)
    raise ValueError(kind)


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=IMG, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES
    )


def family(name: str, n: int = 24, seed: int = 0) -> tuple[L.LightningModule, DataLoader, DataLoader]:
    """``(module, train loader, val loader)`` of a tiny model of family ``name`` (see :data:`ENCDEC_FAMILIES`)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ids, mask, y = _tokens(n, g)
    ids[:, 0] = y + 3  # the label token, clear of the pad/bos/eos ids
    if name == "t5_encoder":
        module: L.LightningModule = T5EncoderClassifier(hf_model(name))
        data: Dataset = DictDataset(input_ids=ids, attention_mask=mask, labels=y)
    elif name in ("t5", "bart", "modernbert"):
        eos = 1 if name == "t5" else 2
        ids[torch.arange(n), mask.sum(1) - 1] = eos  # eos ends every sequence (T5 and BART classify there)
        module, data = HFModule(hf_model(name)), DictDataset(input_ids=ids, attention_mask=mask, labels=y)
    elif name == "torchvision_vit":
        images = torch.randn(n, 3, IMG, IMG, generator=g) + y.float()[:, None, None, None]
        module, data = TupleModule(torchvision_vit()), TupleDataset(images, y)
    else:
        raise ValueError(f"unknown family {name!r}; choose from {ENCDEC_FAMILIES}")
    return module, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)


def library_attention(name: str, module: L.LightningModule, batch: Any, stack: str = "encoder") -> list[Tensor]:
    """The self-attention probabilities ``[B, H, Q, K]`` per layer of ``stack`` as the model's OWN library gives."""
    model = module.model
    module.eval()
    with torch.no_grad():
        if name == "torchvision_vit":
            x = model._process_input(batch[0])
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1) + model.encoder.pos_embedding
            out = []
            for block in model.encoder.layers:
                h = block.ln_1(x)
                out.append(block.self_attention(h, h, h, need_weights=True, average_attn_weights=False)[1])
                x = block(x)
            return out
        was = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            result = model(**inputs, output_attentions=True)
        finally:
            model.set_attn_implementation(was)
        if name in ("t5", "bart"):
            return list(result.encoder_attentions if stack == "encoder" else result.decoder_attentions)
        return list(result.attentions)
