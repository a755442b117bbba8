"""Switch an existing ``transformers.Trainer`` script to a zotune optimizer.

    python examples/hf_trainer.py --output-dir runs/hf-mezo                       # MeZO, tiny random Llama
    python examples/hf_trainer.py --optimizer ip-sgd --lr 0.5 --output-dir runs/hf-ipsgd

The only changes from a plain Trainer script are the import and the two ``zo_*`` arguments; data,
TrainingArguments (the lr, its schedule, logging, saving) stay as they are.
"""

import argparse

import torch

from zotune.hf import ZOTrainer
from zotune.models import random_llama


class Sequences(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main(argv=None) -> None:
    from transformers import TrainingArguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="mezo", choices=["mezo", "adamezo", "ip-sgd"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    model = random_llama("tiny", seed=0)
    data = Sequences(torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0)))
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=8,
        logging_steps=10,
        save_steps=args.steps,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = ZOTrainer(
        model=model,
        args=training_args,
        train_dataset=data,
        eval_dataset=data,
        zo_optimizer=args.optimizer,
        zo_options={"eps": 1e-3} if args.optimizer != "ip-sgd" else {},
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"{args.optimizer}: eval loss {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
