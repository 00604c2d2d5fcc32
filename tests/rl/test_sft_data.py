"""Cold-start SFT rows: the final-answer slip of an imperfect teacher."""
import random

import pytest

from envs import harmony
from envs.math_tasks import MathEnv, solution
from rl.model import VocabMap
from rl.sft import sft_examples, slip_final


def _vmap():
    env = MathEnv(families=["digit_sum"], difficulty=1)
    return env.tasks("train", 200, seed=0), VocabMap.identity()


def _finals(rows, vmap):
    return [harmony.parse_completion(_completion(vmap.to_canonical(r["input_ids"]), r["assistant_masks"])).final
            for r in rows]


def _completion(ids, mask):
    start = mask.index(1)
    return ids[start:]


def test_slip_is_off_by_one_and_never_negative():
    rng = random.Random(0)
    assert {slip_final("13", rng) for _ in range(50)} == {"12", "14"}
    assert {slip_final("0", rng) for _ in range(10)} == {"1"}


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_slip_rate_changes_only_that_fraction_of_finals(rate):
    tasks, vmap = _vmap()
    rows = sft_examples(tasks, solution, vmap, ["low"], final_slip_rate=rate, seed=0)
    finals = _finals(rows, vmap)
    wrong = [f != str(t.metadata["answer"]) for f, t in zip(finals, tasks)]
    assert all(f is not None for f in finals)
    assert sum(wrong) / len(wrong) == pytest.approx(rate, abs=0.07)
    for f, t, w in zip(finals, tasks, wrong):
        if w:
            assert abs(int(f) - int(t.metadata["answer"])) == 1


def test_bad_slip_rate_is_rejected():
    tasks, vmap = _vmap()
    with pytest.raises(ValueError, match="final_slip_rate"):
        sft_examples(tasks, solution, vmap, ["low"], final_slip_rate=1.5)
