"""Property: whatever value a config key is given, `zotune train` trains or stops with one `zotune: error:` line
(exit status 2), never a traceback."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zotune.cli import main
from zotune.config import FIELDS

BASE = [
    "model=random:tiny",
    "num_train=8",
    "num_dev=4",
    "num_test=4",
    "batch_size=2",
    "max_length=48",
    "steps=1",
    "eval_every=0",
    "zero_shot_eval=false",
    "export=false",
    "threads=1",
]
# Values as a user types them after key=: numbers, words, YAML lists and mappings, nulls, booleans.
JUNK = st.one_of(
    st.integers(min_value=-3, max_value=4).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "",
            "null",
            "true",
            "false",
            "[]",
            "[1, 2]",
            "{}",
            "{a: 1}",
            "{r: -1}",
            "{tokens: 0}",
            "abc",
            "cuda:99",
            "fp8",
            "-1e-3",
            "1e9",
            "/dev/null/x",
            "random:nope",
            "local",
            "{eps: 0}",
            "{large_batch: 0}",
            "{L_T: -1}",
            "{window: 0}",
            "{n_directions: 0}",
            "{dual_forward: 1}",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
)
KEYS = sorted(set(FIELDS) - {"output_dir"})  # any name is a valid folder; a bad one is tested in test_faults


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=JUNK)
def test_any_value_of_any_key_trains_or_is_one_clear_error(tmp_path_factory, capsys, key, value):
    run_dir = tmp_path_factory.mktemp("run")
    capsys.readouterr()
    status = main(["train", *BASE, f"{key}={value}", f"output_dir={run_dir}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("zotune:", "Traceback"))]
    assert status in (0, 2), (key, value, status)
    if status == 2:
        assert len(err) == 1 and err[0].startswith("zotune: error:"), (key, value, err)
