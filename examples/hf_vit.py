"""A HuggingFace ViT classifier trained with Lightning, with every analysis callback attached with no arguments.

python examples/hf_vit.py            # or, without touching the script: PDELIGHTNING_CALLBACKS=all ... --bare
"""

import sys

import lightning.pytorch as L
import torch
from _data import image_loaders, trainer
from transformers import ViTConfig, ViTForImageClassification


class ViTModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=3,
        )
        self.model = ViTForImageClassification(config)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


if __name__ == "__main__":
    trainer(sys.argv).fit(ViTModule(), *image_loaders())
