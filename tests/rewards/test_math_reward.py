"""Math-verify reward: tables of answers, MATH-style golds, guarded misreadings, and the contract."""
import pytest

from envs.harmony import END, START, encode, parse_completion, render_completion
from rewards.math_verify_reward import MathReward, verify_answer, verify_batch

TABLE = [
    ("408", "408", 1.0),
    (" 408\n", "408", 1.0),
    ("The answer is 408", "408", 1.0),
    ("The answer is 408.", "408", 1.0),
    ("\\boxed{408}", "408", 1.0),
    ("$408$", "408", 1.0),
    ("$\\frac{816}{2}$", "408", 1.0),
    ("408.0", "408", 1.0),
    ("0408", "408", 1.0),
    ("1,234", "1234", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("$x^2+2x+1$", "(x+1)^2", 1.0),
    ("-12", "-12", 1.0),
    ("12", "-12", 0.0),
    ("407", "408", 0.0),
    ("The answer is 407.", "408", 0.0),
    ("\\boxed{409}", "408", 0.0),
    ("4 0 8", "408", 0.0),
    ("garbage", "408", 0.0),
    ("}{\\frac{", "408", 0.0),
    ("", "408", 0.0),
    (None, "408", 0.0),
]

# Golds as MATH-style datasets write them: bare LaTeX, no $...$. math-verify 0.9.0's plain parse read
# `3\sqrt{13}` as 3 and `2^{10}` as 2, so the wrong finals below scored 1 and the right ones 0.
MATH_GOLDS = [
    ("3\\sqrt{13}", ["$3\\sqrt{13}$", "\\boxed{3\\sqrt{13}}", "$\\sqrt{117}$", "The answer is $3\\sqrt{13}$."],
     ["3", "$\\sqrt{13}$", "13", "$13\\sqrt{3}$"]),
    ("2^{10}", ["1024", "$2^{10}$", "\\boxed{1024}"], ["2", "10", "1000", "$2^{11}$"]),
    ("\\frac{1}{2}", ["0.5", "1/2", "$\\frac12$", "$\\dfrac{1}{2}$"], ["1", "2", "$\\frac{1}{3}$"]),
    ("\\dfrac{3}{4}", ["0.75", "$\\frac{3}{4}$", "3/4"], ["3", "4", "$\\dfrac{4}{3}$"]),
    ("-\\frac{\\pi}{2}", ["$-\\frac{\\pi}{2}$", "$-\\pi/2$", "\\boxed{-\\frac{\\pi}{2}}"],
     ["$\\frac{\\pi}{2}$", "2", "-2", "$-\\pi$"]),
    ("10^{10}", ["10000000000", "$10^{10}$"], ["10", "$10^{9}$"]),
    ("1{,}234", ["1234", "1,234"], ["1", "234"]),
]

# False positives of math-verify 0.9.0 that a policy can reach, fixed upstream afterwards; cases from
# huggingface/Math-Verify tests/test_mixed_number_extraction.py and tests/test_failed_latex_span.py.
GUARDED = [
    ("$2^{10}.$", "2", 0.0),  # failed LaTeX (trailing period) gave its embedded 2
    ("$2^{10}.$", "1024", 1.0),
    ("4 4/9", "4", 0.0),  # a mixed number is not its whole part
    ("The answer is 4 4/9.", "4", 0.0),
    ("The answer is 4 4/9.", "40/9", 1.0),
    ("-4 4/9", "-40/9", 1.0),
    ("11 5/6", "71/6", 1.0),
    ("+11 5/6", "71/6", 1.0),
    ("0 4/9", "4/9", 1.0),
    ("4 0/9", "4", 1.0),
    ("1 000 4/9", "9004/9", 1.0),
    ("4 4/9%", "40/900", 1.0),
    ("4 4/0", "4", 0.0),  # malformed mixed numbers match none of their parts
    ("4 4/0", "0", 0.0),
    ("11 6/6", "12", 0.0),
    ("11 7/6", "73/6", 0.0),
    ("11\n5/6", "71/6", 0.0),  # a line break separates two answers
    ("11\n5/6", "5", 1.0),
    ("11/10 4/9", "139/90", 0.0),  # not mixed-number syntax: no implicit addition
    ("(11) 4/9", "103/9", 0.0),
    ("4 + 4/9", "40/9", 1.0),
    ("There are 4 objects and 4/9 remain.", "4/9", 1.0),
    ("$\\sum_{k=0}^n\\bigl(k\\bigr)$", "0", 0.0),  # no number out of unparseable LaTeX
    ("Final answer is $\\sum_{k=0}^n\\bigl(k\\bigr)$. I hope. 42", "42", 1.0),
    ("$\\sum_{k=0}^n\\bigl(k\\bigr)$ and $42$", "42", 1.0),
    ("$1 + \\frac{1}{\\mathrm{e}}$", "1", 0.0),
]


@pytest.mark.parametrize("final,gold,expected", TABLE + GUARDED)
def test_verify_answer_table(final, gold, expected):
    assert verify_answer(final, gold) == expected


def test_verify_batch_matches_table():
    assert verify_batch([(f, g) for f, g, _ in TABLE]) == [e for _, _, e in TABLE]


@pytest.mark.parametrize("gold,right,wrong", MATH_GOLDS, ids=[g for g, _, _ in MATH_GOLDS])
def test_math_style_golds_are_read_as_latex(gold, right, wrong):
    pairs = [(f, gold) for f in right + wrong]
    assert verify_batch(pairs) == [1.0] * len(right) + [0.0] * len(wrong)


def test_gold_is_the_first_argument_of_verify(make_sample):
    # verify(gold, answer) is not symmetric: a relation answer matches an interval gold only one way.
    reward = MathReward()
    assert reward(make_sample("$(-\\infty, 3]$", answer="x \\le 3")).score == 1.0
    assert reward(make_sample("$x \\le 3$", answer="(-\\infty, 3]")).score == 0.0


def _two_finals(first: str, second: str) -> list[int]:
    """Completion ids with an analysis message and two final-channel messages."""
    one = render_completion("Think.", first)
    two = render_completion(None, second)
    return one[:-1] + [END, START] + encode("assistant") + two


@pytest.mark.parametrize("first,second,gold,expected", [
    ("407", "408", "408", 1.0),
    ("408", "407", "408", 0.0),
])
def test_last_final_message_is_the_answer(make_sample, first, second, gold, expected):
    sample = make_sample("unused", answer=gold)
    sample.completion_ids = _two_finals(first, second)
    sample.transcript = parse_completion(sample.completion_ids)
    assert [m.text for m in sample.transcript.messages if m.channel == "final"] == [first, second]
    assert MathReward()(sample).score == expected


def test_math_reward_on_rendered_samples(make_sample):
    reward = MathReward()
    right = reward(make_sample("The answer is 408.", analysis="17*24=408."))
    wrong = reward(make_sample("407"))
    assert (right.score, right.parts) == (1.0, {"correct": 1.0, "format": 1.0})
    assert (wrong.score, wrong.parts) == (0.0, {"correct": 0.0, "format": 1.0})


def test_answer_key_option(make_sample):
    sample = make_sample("$2^{10}$", answer="2", metadata={"solution": "1024"})
    assert MathReward()(sample).score == 0.0
    assert MathReward(answer_key="solution")(sample).score == 1.0


def test_missing_final_is_a_format_failure_without_math_verify(make_sample, monkeypatch):
    import rewards.math_verify_reward as mvr

    def no_math_verify(pairs, timeout_s):
        assert list(pairs) == [], f"math-verify must not see format failures, got {pairs}"
        return []

    monkeypatch.setattr(mvr, "verify_many", no_math_verify)
    sample = make_sample(None, analysis="17*24 is")
    assert sample.transcript.final is None and not sample.transcript.format_ok
    r = MathReward()(sample)
    assert (r.score, r.parts, r.info["status"]) == (0.0, {"correct": 0.0, "format": 0.0}, "format")


def test_no_answer_in_metadata_is_not_applicable(make_sample):
    assert MathReward()(make_sample("408", answer=None)) is None


@pytest.mark.parametrize("timeout_s", [0, -1.0])
def test_bad_timeout_is_rejected(timeout_s):
    with pytest.raises(ValueError, match="timeout_s"):
        verify_batch([("The answer is 1", "1")], timeout_s=timeout_s)
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=timeout_s)
