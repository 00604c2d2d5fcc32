"""Tiny-world safety tasks: disjoint splits, balanced categories, traces that cite the spec within the
effort budgets, finals that are the spec's own examples, and a vocabulary that covers them."""
from collections import Counter

import pytest

from envs.harmony import encode
from envs.safety_spec import TEMPLATE_SPEC, load_spec
from envs.safety_tasks import SafetyEnv, solution, split_of, vocabulary_corpus
from envs.types import EFFORTS

BUDGETS = {"low": 16, "medium": 64, "high": 256}


@pytest.fixture(scope="module")
def env():
    return SafetyEnv(seed=0)


def test_train_and_test_never_share_a_request(env):
    train = {t.question for s in range(3) for t in SafetyEnv(seed=s).tasks("train", 10_000)}
    test = {t.question for s in range(3) for t in SafetyEnv(seed=s).tasks("test", 10_000)}
    assert train and test and not train & test
    assert len(train) + len(test) == len(env.spec.requests())  # all requests, each in one split
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    per_category = Counter(t.metadata["category"] for t in SafetyEnv(seed=0).tasks("test", 10_000))
    assert set(per_category) == set(env.spec.ids()) and min(per_category.values()) >= 5


def test_tasks_are_seeded_distinct_and_interleaved(env):
    a, b, c = env.tasks("train", 40), env.tasks("train", 40), env.tasks("train", 40, seed=1)
    assert [t.question for t in a] == [t.question for t in b] != [t.question for t in c]
    assert len({t.task_id for t in a}) == 40
    assert {t.metadata["category"] for t in a[:10]} == set(env.spec.ids())  # every batch has both kinds
    for t in a:
        assert t.env == "safety" and t.developer is None and t.metadata["prompt"] == t.question
        assert split_of(t.question) == "train" and t.metadata["expected"] == env.spec.category(
            t.metadata["category"]).response
    assert len(env.tasks("test", 10**6)) < 10**6  # all of them when fewer exist


def test_categories_filter_and_open_spec_rejected():
    env = SafetyEnv(categories=("hacking", "account_security"))
    assert {t.metadata["category"] for t in env.tasks("train", 50)} == {"hacking", "account_security"}
    with pytest.raises(ValueError, match="needs a closed spec"):
        SafetyEnv(spec_path=TEMPLATE_SPEC)
    with pytest.raises(ValueError, match="'nope'"):
        SafetyEnv(categories=("nope",))


def test_finals_are_the_spec_examples():
    """The SFT finals are the spec's own example responses for the example requests."""
    env = SafetyEnv()
    spec = env.spec
    for cat in spec.categories:
        for ex in cat.examples:
            hit_cat, slots = spec.classify(ex.prompt)
            assert hit_cat.id == cat.id
            task = env._task(ex.prompt, cat, slots, split_of(ex.prompt))
            for effort in EFFORTS:
                assert solution(task, effort)[1] == ex.response


def test_traces_cite_category_and_rule_within_budgets(env):
    tasks = env.tasks("train", 300) + env.tasks("test", 100)
    for t in tasks:
        cat = env.spec.category(t.metadata["category"])
        lengths = []
        for effort in EFFORTS:
            analysis, final = solution(t, effort)
            assert cat.id in analysis and cat.rule.split(":")[0] in analysis and cat.response in analysis
            if effort != "low":
                assert cat.rule in analysis
            n = len(encode(analysis))
            assert n <= BUDGETS[effort], (effort, analysis)
            lengths.append(n)
        assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
        assert final not in analysis  # the analysis reasons; the final answers


def test_vocabulary_corpus_covers_tasks_and_traces():
    vocab = {i for s in vocabulary_corpus() for i in encode(s)}
    texts = {x for t in SafetyEnv(seed=5).tasks("test", 150) for x in (t.question, *(
        y for e in EFFORTS for y in solution(t, e)))}
    for text in texts:
        missing = set(encode(text)) - vocab
        assert not missing, (text, missing)


def test_solution_follows_the_spec_the_task_names(tmp_path):
    """A task made with an edited spec gets that spec's response (the spec is data, not code)."""
    import yaml

    raw = yaml.safe_load(open(load_spec().path))
    raw["responses"]["refuse"] = ["Sorry, no."]
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    t = next(t for t in SafetyEnv(spec_path=str(path)).tasks("train", 40) if t.metadata["category"] == "weapons")
    assert solution(t, "low")[1] == "Sorry, no."
