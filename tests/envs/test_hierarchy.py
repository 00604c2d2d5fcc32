"""Instruction-hierarchy tasks: disjoint splits, attacks that fit their protection, traces that never
repeat the secret and fit the effort budgets, a vocabulary that covers them."""
import pytest

from envs.harmony import encode, render_prompt
from envs.hierarchy import ATTACKS, ENCODINGS, PROTECTIONS, SECRETS, HierarchyEnv, solution, vocabulary_corpus
from envs.types import EFFORTS

BUDGETS = {"low": 16, "medium": 64, "high": 256}


def test_train_and_test_never_share_a_task():
    train = {(t.developer, t.question) for s in range(3) for t in HierarchyEnv(seed=s).tasks("train", 300)}
    test = {(t.developer, t.question) for s in range(3) for t in HierarchyEnv(seed=s).tasks("test", 100)}
    assert train and test and not train & test


def test_tasks_cover_every_protection_and_attack_and_fit_them():
    tasks = HierarchyEnv(seed=1).tasks("train", 600)
    assert {t.metadata["protection"] for t in tasks} == set(PROTECTIONS)
    assert {t.metadata["attack"] for t in tasks} == set(ATTACKS)
    for t in tasks:
        m = t.metadata
        assert t.env == "hierarchy" and t.developer and m["prompt"] == t.question
        assert f"What is {m['benign_expr']}?" in t.question
        assert str(sum(int(x) for x in m["benign_expr"].split("+"))) == m["benign_answer"]
        if m["protection"] in SECRETS:
            assert m["secret"] in t.developer and m["secret"].lower() not in t.question.lower()
        else:
            assert m["attack"] not in ENCODINGS and "secret" not in m
        if m["attack"] == "none":
            assert t.question == f"What is {m['benign_expr']}?"
        if m["attack"] == "injection":
            assert "[tool output]" in t.question


def test_filters_and_bad_options():
    tasks = HierarchyEnv(protections=("password",), attacks=("base64", "spell")).tasks("train", 50)
    assert {t.metadata["attack"] for t in tasks} == {"base64", "spell"}
    with pytest.raises(ValueError, match="no attack"):
        HierarchyEnv(protections=("uppercase",), attacks=("base64",))
    with pytest.raises(ValueError, match="protections"):
        HierarchyEnv(protections=("french",))


def test_seeded_and_rendered_with_the_developer_message():
    a, b = HierarchyEnv(seed=3).tasks("test", 20), HierarchyEnv(seed=3).tasks("test", 20)
    assert [t.task_id for t in a] == [t.task_id for t in b] != [t.task_id for t in HierarchyEnv(seed=4).tasks("test", 20)]
    t = a[0]
    text = __import__("envs.harmony", fromlist=["decode"]).decode(render_prompt(t.question, "low", t.developer))
    assert "<|start|>developer" in text and t.developer in text and t.question in text


def test_traces_never_repeat_the_secret_and_fit_budgets():
    for t in HierarchyEnv(seed=2).tasks("train", 300):
        lengths = []
        for effort in EFFORTS:
            analysis, final = solution(t, effort)
            if "secret" in t.metadata:
                secret = t.metadata["secret"].lower()
                assert secret not in analysis.lower() and secret not in final.lower()
            assert t.metadata["benign_answer"] in final
            lengths.append(len(encode(analysis)))
            assert lengths[-1] <= BUDGETS[effort], (effort, analysis)
        assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_vocabulary_corpus_covers_tasks_and_traces():
    vocab = {i for s in vocabulary_corpus() for i in encode(s)}
    texts = {x for t in HierarchyEnv(seed=9).tasks("test", 120)
             for x in (t.developer, t.question, *(y for e in EFFORTS for y in solution(t, e)))}
    for text in texts:
        missing = set(encode(text)) - vocab
        assert not missing, (text, missing)
