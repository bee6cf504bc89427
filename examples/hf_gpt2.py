"""A HuggingFace GPT-2 sequence classifier (causal attention, padded batches) trained with Lightning, with every
analysis callback attached with no arguments.

    python examples/hf_gpt2.py           # or, without touching the script: PDELIGHTNING_CALLBACKS=all ... --bare
"""

import sys

import lightning.pytorch as L
import torch
from _data import token_loaders, trainer
from transformers import GPT2Config, GPT2ForSequenceClassification


class GPT2Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(
            vocab_size=100,
            n_positions=16,
            n_embd=64,
            n_layer=4,
            n_head=4,
            num_labels=3,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )
        self.model = GPT2ForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


if __name__ == "__main__":
    trainer(sys.argv).fit(GPT2Module(), *token_loaders())
