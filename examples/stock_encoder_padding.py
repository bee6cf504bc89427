"""A stock ``nn.TransformerEncoder`` over padded token batches ``(ids, padding_mask, y)`` (the fused fast path and
nested tensors on, as PyTorch ships them), with every analysis callback attached with no arguments.

    python examples/stock_encoder_padding.py   # or: PDELIGHTNING_CALLBACKS=all ... --bare
"""

import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _data import token_loaders, trainer
from torch import nn


class EncoderModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64, padding_idx=0)
        layer = nn.TransformerEncoderLayer(64, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4)
        self.head = nn.Linear(64, 3)

    def forward(self, ids, padding_mask):
        h = self.encoder(self.embed(ids), src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        return F.cross_entropy(self(ids, mask), y)

    def validation_step(self, batch, batch_idx):
        ids, mask, y = batch
        self.log("val/loss", F.cross_entropy(self(ids, mask), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


if __name__ == "__main__":
    trainer(sys.argv).fit(EncoderModule(), *token_loaders(dicts=False))
