"""Placeholder for the embedded-default chain (pre-train -> SFT -> DPO), replaced by the recipes issue.

Trains a tiny random Llama for a few steps with the Litespark Trainer flag on random tokens and prints the losses,
so that the README's main command runs end to end on any machine.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from litespark_hf import Trainer, TrainingArguments


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32, vocab=256):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (4, seq), generator=g).repeat(n // 4, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    args = TrainingArguments(output_dir="outputs/chain-placeholder", max_steps=30, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=10, report_to=[], use_litespark=True,
                             use_cpu=not torch.cuda.is_available(), save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
    out = trainer.train()
    print(f"placeholder chain: final training loss {out.training_loss:.3f}")


if __name__ == "__main__":
    main()
