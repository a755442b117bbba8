"""A zotune optimizer in a hand-written PyTorch loop: the closure protocol.

    python examples/plain_loop.py                      # a tiny random Llama, a few seconds on a CPU
    python examples/plain_loop.py --optimizer ip-sgd   # any of mezo, adamezo, ip-sgd, addax

The closure returns the loss and never calls backward: MeZO and AdaMeZO call it twice per step under
inference mode (at θ+εz and θ−εz); IP-SGD calls it once and runs backward itself, updating each
parameter inside backward. Addax takes two closures, the long and the short batch.
"""

import argparse

import torch

from zotune import create_optimizer
from zotune.models import random_llama


def lm_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="mezo", choices=["mezo", "adamezo", "ip-sgd", "addax"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_llama("tiny", seed=0)
    data = torch.randint(0, 64, (32, 16))  # one fixed set of sequences, to be memorised
    with torch.no_grad():
        print(f"initial loss on all sequences: {lm_loss(model, data).item():.4f}")
    # Zeroth-order steps move every weight along a random direction: they need far smaller rates than SGD.
    options = {
        "mezo": dict(lr=3e-3, eps=1e-3),
        "adamezo": dict(lr=3e-5, eps=1e-3),
        "ip-sgd": dict(lr=0.5),
        "addax": dict(lr=0.5, alpha=1e-2, eps=1e-3),
    }[args.optimizer]
    optimizer = create_optimizer(args.optimizer, model, **options)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=args.steps)
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(0, len(data), (8,))]
        if args.optimizer == "addax":  # here simply two halves; `zotune train` splits by length
            loss = optimizer.step(lambda: lm_loss(model, batch[:4]), lambda: lm_loss(model, batch[4:]))
        else:
            loss = optimizer.step(lambda: lm_loss(model, batch))
        scheduler.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}: loss {loss:.4f}")
    with torch.no_grad():
        print(f"final loss on all sequences: {lm_loss(model, data).item():.4f}")


if __name__ == "__main__":
    main()
