"""A TransformerLens ``HookedTransformer`` (3.x) used as a classifier, trained with Lightning, with every analysis
callback attached with no arguments.

    python examples/transformer_lens_model.py   # or: PDELIGHTNING_CALLBACKS=all ... --bare
"""

import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _data import token_loaders, trainer
from transformer_lens import HookedTransformer, HookedTransformerConfig


class TLModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = HookedTransformerConfig(
            n_layers=4, d_model=64, n_ctx=16, d_head=16, n_heads=4, d_vocab=100, act_fn="gelu", seed=0
        )
        self.model = HookedTransformer(config)

    def forward(self, ids):
        return self.model(ids)[:, -1, :3]  # the last position's first three logits as the class scores

    def training_step(self, batch, batch_idx):
        ids, _, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch, batch_idx):
        ids, _, y = batch
        self.log("val/loss", F.cross_entropy(self(ids), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)

    def probe_forward(self, batch):  # the batch carries a mask this model does not take: say how to call it
        return self(batch[0])


if __name__ == "__main__":
    trainer(sys.argv).fit(TLModule(), *token_loaders(dicts=False))
