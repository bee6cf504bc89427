"""Tiny models of every family the adapters support, built from configs with random init (nothing downloaded),
each wrapped in the LightningModule a user would write, with loaders of the batches that family takes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pdelightning.models import TransformerClassifier
from pdelightning.task import ClassificationTask

NUM_CLASSES, VOCAB, SEQ, IMG = 3, 50, 8, 16


class DictDataset(Dataset):
    """Samples as dicts (HuggingFace style), default-collated into dict batches."""

    def __init__(self, **columns: Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class TupleDataset(Dataset):
    def __init__(self, *columns: Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(c[i] for c in self.columns)


def _tokens(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids with right padding (id 0) and the HF attention mask; the label is planted in the first token."""
    y = torch.arange(n) % NUM_CLASSES
    ids = torch.randint(NUM_CLASSES + 1, VOCAB, (n, SEQ), generator=g)
    ids[:, 0] = y + 1
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = ids * mask
    return ids, mask, y


class HFModule(L.LightningModule):
    """What a user writes around a HuggingFace model: dict batches in, ``model(**batch).loss`` out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.model(**inputs).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model(**batch).loss, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TupleModule(L.LightningModule):
    """A user's module taking ``(x, y)`` or ``(x, mask, y)`` batches, forward ``model(*inputs)`` -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(*inputs)

    def _loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        *inputs, y = batch
        return F.cross_entropy(self(*inputs), y)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch[-1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PaddedEncoder(nn.Module):
    """A stock ``nn.TransformerEncoder`` over token embeddings with a key padding mask (``True`` = padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)  # nested tensors on: the fast path a probe must avoid
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


class CustomAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(z.transpose(1, 2).reshape(b, t, d))


class CustomBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mixer = CustomAttention(d)
        self.ff = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.ff(self.norm2(x))


class CustomTransformer(nn.Module):
    """A user's own causal Transformer with no recognisable names: found as the repeated block list."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 16)
        self.trunk = nn.ModuleList([CustomBlock() for _ in range(2)])
        self.cls = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x)
        for block in self.trunk:
            h = block(h)
        return self.cls(h[:, -1])


class TLClassifier(nn.Module):
    """TransformerLens ``HookedTransformer`` used as a classifier (the first logits of the last position)."""

    def __init__(self) -> None:
        super().__init__()
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=2, d_model=16, n_ctx=SEQ, d_head=8, n_heads=2, d_vocab=VOCAB, act_fn="gelu", seed=0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tl = HookedTransformer(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.tl(x)[:, -1, :NUM_CLASSES]


def _hf(kind: str) -> nn.Module:
    import transformers as tr

    tr.logging.set_verbosity_error()
    small = {"num_labels": NUM_CLASSES}
    if kind == "bert":
        cfg = tr.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=SEQ, **small)  # fmt: skip
        return tr.BertForSequenceClassification(cfg)
    if kind == "vit":
        cfg = tr.ViTConfig(image_size=IMG, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, **small)  # fmt: skip
        return tr.ViTForImageClassification(cfg)
    if kind == "gpt2":
        cfg = tr.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, pad_token_id=0,
                            bos_token_id=1, eos_token_id=1, **small)  # fmt: skip
        return tr.GPT2ForSequenceClassification(cfg)
    if kind == "llama":
        cfg = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                             pad_token_id=0, bos_token_id=1, eos_token_id=1, **small)  # fmt: skip
        return tr.LlamaForSequenceClassification(cfg)
    raise ValueError(kind)


def _timm() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=4, embed_dim=16, depth=2, num_heads=2,
        num_classes=NUM_CLASSES, in_chans=1,
    )  # fmt: skip


def family(name: str, n: int = 24, seed: int = 0) -> tuple[L.LightningModule, DataLoader, DataLoader]:
    """``(module, train loader, val loader)`` of a tiny model of family ``name`` (see :data:`FAMILIES`)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ids, mask, y = _tokens(n, g)
    images = torch.randn(n, 1, IMG, IMG, generator=g) + y.float()[:, None, None, None]
    if name in ("bert", "gpt2", "llama"):
        module: L.LightningModule = HFModule(_hf(name))
        data: Dataset = DictDataset(input_ids=ids, attention_mask=mask, labels=y)
    elif name == "vit":
        module, data = HFModule(_hf("vit")), DictDataset(pixel_values=images, labels=y)
    elif name == "timm":
        module, data = TupleModule(_timm()), TupleDataset(images, y)
    elif name == "torch":
        module, data = TupleModule(PaddedEncoder()), TupleDataset(ids, mask == 0, y)
    elif name == "transformer_lens":
        module, data = TupleModule(TLClassifier()), TupleDataset(ids, y)
    elif name == "custom":
        module, data = TupleModule(CustomTransformer()), TupleDataset(ids, y)
    elif name == "ours":
        model = TransformerClassifier(num_classes=NUM_CLASSES, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                      input_kind="tokens", vocab_size=VOCAB, max_len=SEQ)  # fmt: skip
        module, data = ClassificationTask(model, num_classes=NUM_CLASSES), TupleDataset(ids, y)
    else:
        raise ValueError(f"unknown family {name!r}; choose from {FAMILIES}")
    return module, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)


FAMILIES = ("bert", "vit", "gpt2", "llama", "timm", "torch", "transformer_lens", "custom", "ours")


def library_attention(name: str, module: L.LightningModule, batch: Any) -> list[Tensor]:
    """The attention probabilities ``[B, H, Q, K]`` per layer as the model's OWN library computes them."""
    model = module.model
    module.eval()
    with torch.no_grad():
        if name in ("bert", "gpt2", "llama", "vit"):
            was = model.config._attn_implementation
            model.set_attn_implementation("eager")
            try:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                return list(model(**inputs, output_attentions=True).attentions)
            finally:
                model.set_attn_implementation(was)
        if name == "transformer_lens":
            _, cache = model.tl.run_with_cache(batch[0])
            return [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(2)]
        if name == "torch":
            x, pad = batch[0], batch[1]
            h, out = model.embed(x), []
            for layer in model.encoder.layers:
                out.append(layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=True,
                                           average_attn_weights=False)[1])  # fmt: skip
                h = layer(h, src_key_padding_mask=pad)
            return out
        if name == "timm":
            out: list[Tensor] = []
            hooks = [b.attn.attn_drop.register_forward_hook(lambda m, a, o: out.append(o)) for b in model.blocks]
            for b in model.blocks:
                b.attn.fused_attn = False
            try:
                model(batch[0])
            finally:
                for h in hooks:
                    h.remove()
                for b in model.blocks:
                    b.attn.fused_attn = True
            return out
        if name == "custom":
            h, out = model.tok(batch[0]), []
            for block in model.trunk:
                x = block.norm1(h)
                b, t, d = x.shape
                q, k, _ = block.mixer.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
                scores = (q @ k.transpose(-2, -1)) / (d // 2) ** 0.5
                causal = torch.ones(t, t, dtype=torch.bool).tril()
                out.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
                h = block(h)
            return out
        if name == "ours":
            out = []
            hooks = [b.attn.hook_pattern.register_forward_hook(lambda m, a, o: out.append(o)) for b in model.blocks]
            try:
                model(batch[0])
            finally:
                for h in hooks:
                    h.remove()
            return out
    raise ValueError(name)


def own_loss(name: str, module: L.LightningModule, batch: Any) -> Tensor:
    """The model's own mean validation loss on a batch (what its ``validation_step`` logs)."""
    module.eval()
    with torch.no_grad():
        if isinstance(module, HFModule):
            return module.model(**batch).loss
        if isinstance(module, ClassificationTask):
            return F.cross_entropy(module(batch[0]), batch[1])
        return module._loss(batch)


Builder = Callable[[], Any]
