"""The papers' claims, and the runs that test each on this machine (``zotune bench reproduce``).

Each claim compares a method with MeZO (and, where the claim is about memory, a first-order baseline) on one
recipe: a learning-rate grid per optimizer on dev (one seed, ``grid_steps``), then the chosen setting with
three seeds for ``final_steps``, the best-dev checkpoint scored on test. Budgets are sized for 2 CPU cores;
``GPU_RECIPES`` names the runs that would test a claim at the papers' scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arm:
    """One optimizer of a claim: its grid (values of one key, e.g. ``lr``) and the overrides it always takes.
    ``seconds_per_step`` is the plan's estimate until a run of it has finished in the suite's folder."""

    label: str
    optimizer: str
    grid: tuple[str, tuple]
    fixed: tuple[str, ...] = ()
    seconds_per_step: float = 2.0
    grid_search: bool = True  # False: a reference run at its first grid value (memory, not accuracy)


@dataclass(frozen=True)
class Claim:
    """A claim and its test. The verdict (``zotune.bench.reproduce.verdict``) compares ``method`` with MeZO:
    its accuracy must be better (``better``; else not worse), it must reach MeZO's best dev metric in at most
    ``max_ratio`` of MeZO's ``sooner`` ("passes" or "seconds"), and, with ``memory`` = (arm, bound), the
    method's peak over MeZO's must be at most ``bound`` (arm "mezo") or that arm's peak over the method's at
    least ``bound`` (a first-order arm)."""

    name: str
    paper: str  # the paper's figure, from its abstract
    config: str
    arms: tuple[Arm, ...]
    grid_steps: int
    final_steps: int
    eval_every: int
    method: str
    sooner: str
    max_ratio: float
    better: bool
    memory: tuple[str, float] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = field(default=())
    gpu_recipe: str = ""
    scale_gap: str = ""  # what the paper's setting has that this one lacks: the report's paragraph where it does not hold


CLAIMS = {
    "adamezo": Claim(
        name="adamezo",
        paper="AdaMeZO outperforms MeZO with up to 70% fewer forward passes",
        config="configs/demo-sentiment-mezo.yaml",
        arms=(
            Arm("mezo", "mezo", ("lr", (2e-5, 5e-5, 1e-4)), seconds_per_step=2.3),
            Arm("adamezo", "adamezo", ("lr", (5e-6, 2e-5, 5e-5)), seconds_per_step=5.0),
        ),
        grid_steps=100,
        final_steps=300,
        eval_every=25,
        method="adamezo",
        sooner="passes",
        max_ratio=0.7,
        better=False,
        gpu_recipe="configs/paper/adamezo-opt1.3b-sst2.yaml (OPT-1.3B, SST-2, thousands of steps)",
        scale_gap="The paper's saving is measured on OPT-1.3B and larger over thousands of steps, where MeZO's "
        "estimate is noisiest (its variance grows with the number of parameters) and moments over a window have "
        "time to pay off. Here a 135M model trains for 300 steps: AdaMeZO's h + 1 plain MeZO warm-up steps and its "
        "window are a large share of the budget, and with 100 dev examples one example is a point of accuracy, so "
        "when a run first reaches MeZO's best dev turns on one or two examples.",
    ),
    "addax": Claim(
        name="addax",
        paper="Addax beats MeZO in accuracy and reaches it far sooner (15-30x on OPT-13B/30B), in memory close to "
        "MeZO's; IP-SGD needs much more memory",
        config="configs/addax-sentiment.yaml",
        arms=(
            Arm("mezo", "mezo", ("lr", (2e-5, 5e-5, 1e-4)), ("optimizer_options={eps: 1.0e-3}",), seconds_per_step=4.0),
            Arm("addax", "addax", ("lr", (3e-4, 1e-3, 3e-3)), seconds_per_step=4.0),
            Arm("ip-sgd", "ip-sgd", ("lr", (1e-3,)), ("optimizer_options={}",), seconds_per_step=6.0, grid_search=False),
        ),
        grid_steps=60,
        final_steps=200,
        eval_every=20,
        method="addax",
        sooner="seconds",
        max_ratio=1.0,
        better=True,
        memory=("mezo", 1.5),
        gpu_recipe="configs/paper/addax-opt13b-sst2.yaml (OPT-13B, SST-2)",
        scale_gap="The paper's 15-30x is on OPT-13B and OPT-30B, where MeZO's estimate is noisiest (its variance "
        "grows with the number of parameters) and a first-order step on short examples is worth many ZO steps. "
        "At 135M parameters MeZO's handicap is far smaller, and on 2 CPU cores a backward pass costs several "
        "forward passes' time, so seconds to target favour MeZO more than on a GPU. Peak memory here is the "
        "process's resident set, which the Python runtime and the model's weights dominate at this size.",
    ),
    "svrg": Claim(
        name="svrg",
        paper="MeZO-SVRG: up to 20% higher test accuracy than MeZO, MeZO's peak accuracy with about half the "
        "GPU-hours, about 2x less memory than first-order SGD",
        config="configs/minilm-classifier-sentiment.yaml",
        arms=(
            Arm("mezo", "mezo", ("lr", (1e-4, 3e-4, 1e-3)), seconds_per_step=0.4),
            Arm(
                "svrg",
                "svrg",
                ("lr", (1e-4, 3e-4, 1e-3)),
                ("optimizer_options={anchor_lr: 1.0e-3, anchor_every: 2, eps: 1.0e-3, large_batch: 64}",),
                seconds_per_step=1.2,
            ),
            Arm("sgd", "sgd", ("lr", (1e-2,)), ("optimizer_options={}",), seconds_per_step=0.5, grid_search=False),
        ),
        grid_steps=500,
        final_steps=2000,
        eval_every=100,
        method="svrg",
        sooner="seconds",
        max_ratio=0.5,
        better=True,
        memory=("sgd", 2.0),
        gpu_recipe="configs/paper/svrg-roberta-large-sst2.yaml (RoBERTa-large, SST-2, the paper's prompt-free setting)",
        scale_gap="The paper's gains are on RoBERTa-large, GPT-2 and OPT models up to 7B, trained far longer than "
        "2,000 steps, and its memory saving is stated for autoregressive models, growing with batch size and "
        "context length. Here a 22.7M encoder with a fresh head trains on short sentences at batch 16, so "
        "activations and gradients are small beside the process's resident set (runtime and weights), the "
        "measure of peak memory on a CPU.",
    ),
}
