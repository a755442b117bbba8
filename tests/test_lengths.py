import pytest

from zotune.config import ConfigError
from zotune.lengths import (
    LengthSplit,
    choose_threshold,
    even_threshold,
    example_length,
    first_order_peak_bytes,
    parse_memory,
    plan_addax,
)
from zotune.models import random_llama
from zotune.sampling import AddaxBatches
from zotune.scoring import EncodedExample, classification_loss


def example(length, candidates=2):
    return EncodedExample(tuple((1,) * length for _ in range(candidates)), (1,) * candidates, 0, False)


EXAMPLES = [example(n) for n in (10, 12, 12, 20, 31, 40, 40, 55)]


def test_split_and_even_threshold():
    lengths = [example_length(e) for e in EXAMPLES]
    split = LengthSplit.by_threshold(lengths, 20)
    assert split.long == (4, 5, 6, 7) and split.short == (0, 1, 2, 3)
    assert even_threshold(lengths) == 20
    assert even_threshold([8, 64, 64, 64, 64]) == 8  # a median (64) would leave D0 empty


def test_addax_batches_draw_from_their_buckets_and_resume():
    split = LengthSplit.by_threshold([example_length(e) for e in EXAMPLES], 20)
    batches = AddaxBatches(split, 3, 2, seed=0)
    drawn = [tuple(batches.next_batches().values()) for _ in range(4)]
    for long, short in drawn:
        assert len(long) == 3 and set(long) <= set(split.long)
        assert len(short) == 2 and set(short) <= set(split.short)
    assert sorted(drawn[0][1] + drawn[1][1]) == list(split.short)  # each bucket in shuffled epochs
    saved = batches.state_dict()
    expected = [batches.next_batches() for _ in range(4)]
    resumed = AddaxBatches(split, 3, 2, seed=0)
    resumed.load_state_dict(saved)
    assert [resumed.next_batches() for _ in range(4)] == expected


def test_plan_defaults_and_notes():
    plan = plan_addax({"L_T": 20}, EXAMPLES, batch_size=4)
    assert (plan.k0, plan.k1, plan.split.threshold) == (2, 2, 20)
    assert "D0 (zeroth-order, longer) 4 examples, D1 (first-order) 4" in plan.notes[0]
    wa = plan_addax({"by_length": False, "K0": 3, "K1": 5}, EXAMPLES, batch_size=4)
    assert wa.split.long == wa.split.short == tuple(range(8)) and (wa.k0, wa.k1) == (3, 5)


@pytest.mark.parametrize("threshold,empty,fallback", [(55, "D0", "IP-SGD on D1"), (9, "D1", "MeZO on D0")])
def test_empty_bucket_falls_back_with_a_note_or_refuses(threshold, empty, fallback):
    plan = plan_addax({"L_T": threshold, "K0": 1, "K1": 1}, EXAMPLES, batch_size=2)
    assert f"{empty} is empty" in plan.notes[-1] and f"falls back to {fallback}" in plan.notes[-1]
    with pytest.raises(ConfigError, match=f"{empty} is empty.*on_empty_bucket=fallback"):
        plan_addax({"L_T": threshold, "on_empty_bucket": "error"}, EXAMPLES, batch_size=2)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"L_T": 20, "K0": 5}, "K0=5 is larger than D0, which holds 4 examples"),
        ({"L_T": 20, "K1": 0}, "K1 must be a positive integer"),
        ({"L_T": -3}, "L_T must be a positive number of tokens or auto"),
        ({"L_T": "auto"}, "L_T: auto needs memory_budget"),
        ({"L_T": 20, "memory_budget": "6GB"}, "memory_budget is used only with L_T: auto"),
        ({"L_T": 20, "on_empty_bucket": "skip"}, "on_empty_bucket must be fallback or error"),
        ({"LT": 20}, "unknown Addax data option 'LT'"),
    ],
)
def test_bad_addax_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        plan_addax(options, EXAMPLES, batch_size=4)


def test_addax_wa_refuses_a_length_threshold():
    with pytest.raises(ConfigError, match="addax-wa draws both batches from the whole training set"):
        plan_addax({"by_length": False, "L_T": 20}, EXAMPLES, batch_size=4)


def test_parse_memory():
    assert parse_memory("6GB") == 6 * 10**9 and parse_memory("512 MiB") == 512 * 2**20 and parse_memory(1e9) == 10**9
    with pytest.raises(ConfigError, match="not a size"):
        parse_memory("six gigs")


def test_choose_threshold_is_the_largest_length_within_budget():
    examples = EXAMPLES + [example(30, candidates=5)]  # short but wide: the worst batch from length 30 on
    measured_batches = []

    def measure(indices):
        measured_batches.append(indices)
        worst = examples[indices[0]]
        return 100 * len(indices) * len(worst.sequences) * example_length(worst)

    threshold, measurements = choose_threshold(examples, 2, budget=100 * 2 * 2 * 40, measure=measure)
    assert threshold == 20  # from 30 on, the 5-candidate example (5 × 30 > 2 × 40) is in D1's worst batch
    assert len(measurements) <= 4 and all(len(b) == 2 for b in measured_batches)
    with pytest.raises(ConfigError, match="memory_budget .* is too small.*shortest length \\(10 tokens\\)"):
        choose_threshold(examples, 2, budget=10, measure=measure)


def test_first_order_peak_grows_with_sequence_length():
    model = random_llama("tiny", seed=0)
    peaks = [first_order_peak_bytes(model, lambda: classification_loss(model, [example(n)] * 4, 0)) for n in (16, 64)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < peaks[0] < peaks[1]
    assert all(p.grad is None for p in model.parameters())


def test_auto_threshold_under_data_parallel_is_rank_zeros():
    """Ranks measure memory on their own devices; a rank whose L_T: auto came out different takes rank 0's."""
    from zotune.lengths import agreed_plan

    class RankOneOfTwo:
        def from_first(self, value):
            return 20  # what rank 0 chose

    options = {"L_T": "auto", "memory_budget": "1GB"}
    own = plan_addax(
        options, EXAMPLES, 4, measure=lambda indices: 100 * max(example_length(EXAMPLES[i]) for i in indices)
    )  # this rank's device allows every length: L_T = 55
    assert own.split.threshold == 55
    agreed = agreed_plan(own, RankOneOfTwo().from_first, options, EXAMPLES, 4)
    assert agreed.split == plan_addax({"L_T": 20}, EXAMPLES, 4).split
    same = plan_addax({"L_T": 20}, EXAMPLES, 4)
    assert agreed_plan(same, RankOneOfTwo().from_first, options, EXAMPLES, 4) is same
