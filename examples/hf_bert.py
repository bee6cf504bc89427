"""A HuggingFace BERT classifier trained with Lightning, with every analysis callback attached with no arguments.

python examples/hf_bert.py            # or, without touching the script: PDELIGHTNING_CALLBACKS=all ... --bare
"""

import sys

import lightning.pytorch as L
import torch
from _data import token_loaders, trainer
from transformers import BertConfig, BertForSequenceClassification


class BertModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=16,
            num_labels=3,
        )
        self.model = BertForSequenceClassification(config)  # random init from a config: nothing is downloaded

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


if __name__ == "__main__":
    trainer(sys.argv).fit(BertModule(), *token_loaders())
