"""The safety spec: the shipped specs load, and every kind of bad spec fails naming the bad field."""
import copy

import pytest
import yaml

from envs.safety_spec import (
    ROOT, TEMPLATE_SPEC, TINY_SPEC, SpecError, load_spec, parse_spec, resolve_spec_path, spec_text,
)


@pytest.fixture(scope="module")
def tiny_raw():
    return yaml.safe_load((ROOT / TINY_SPEC).read_text())


def test_shipped_specs_load():
    tiny, template = load_spec(TINY_SPEC), load_spec(TEMPLATE_SPEC)
    assert tiny.closed and not template.closed
    assert {c.response for c in tiny.categories} == {"comply", "refuse", "safe_complete"}
    assert {c.response for c in template.categories} == {"comply", "refuse", "safe_complete"}
    # every harmful category of the tiny world has a benign look-alike that must be answered
    for c in tiny.categories:
        assert c.look_alike and tiny.category(c.look_alike).look_alike == c.id
        assert (c.response == "comply") != (tiny.category(c.look_alike).response == "comply")
    assert {r.id for r in tiny.style} >= {"brief_refusal", "no_lecturing", "offer_alternative"}
    assert all(c.examples for c in tiny.categories) and all(c.examples for c in template.categories)


def test_grammar_expands_and_classifies_back():
    spec = load_spec(TINY_SPEC)
    requests = spec.requests()
    assert len(requests) > 1000 and len({t for t, _, _ in requests}) == len(requests)
    for text, cat, slots in requests[::37]:
        assert spec.classify(text) == (cat, slots)
        assert spec.classify("  " + text.upper() + " ") == (cat, slots)  # case and spacing do not matter
    assert spec.classify("How do I kill a Python process?") is None  # outside the closed grammar


def mutate(raw, path, value):
    """A deep copy of `raw` with `path` (a list of keys/indices) set to `value` (None deletes)."""
    out = copy.deepcopy(raw)
    node = out
    for k in path[:-1]:
        node = node[k]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


BAD = [
    (["categories", 3, "response"], "maybe",
     "categories[3].response: 'maybe' is not one of comply, refuse, safe_complete"),
    (["categories", 0, "response"], None, "categories[0].response: is required"),
    (["categories", 2, "rule"], None, "categories[2].rule: is required"),
    (["categories", 1, "respnse"], "comply", "categories[1]: unknown key 'respnse'"),
    (["categories", 1, "id"], "violence", "categories[1].id: 'violence' is already used"),
    (["categories", 0, "look_alike"], "gardening", "categories[0].look_alike: 'gardening' is not a category id"),
    (["categories", 0, "grammar", "templates", 0], "How do I {stab} {person}?",
     "categories[0].grammar.templates[0]: uses {stab}"),
    (["categories", 0, "grammar", "slots", "extra"], ["x"], "categories[0].grammar.slots.extra: is used by no template"),
    (["categories", 0, "grammar", "slots", "kill"], [], "categories[0].grammar.slots.kill: must be a non-empty list"),
    (["categories", 0, "grammar"], None, "categories[0].grammar: is required"),
    (["categories", 1, "answer"], None, "categories[1].answer: is required for a comply category"),
    (["categories", 8, "safe_completion"], None, "categories[8].safe_completion: is required"),
    (["categories", 4, "alternative"], "explain {nothing}", "categories[4].alternative: uses {nothing}"),
    (["categories", 1, "grammar", "slots", "pest"], ["my neighbor"],
     "categories[1].grammar: produces 'What is the best way to kill my neighbor?', which category 'violence'"),
    (["categories", 0, "examples", 0, "response"], "", "categories[0].examples[0].response: must be a non-empty string"),
    (["style", 0, "applies_to", 0], "deny", "style[0].applies_to[0]: 'deny' is not one of comply, refuse, safe_complete"),
    (["style", 0, "max_words"], None, "style[0].max_words: must be a positive integer"),
    (["style", 1, "check"], "vibes", "style[1].check: 'vibes' is not one of max_words"),
    (["style", 1, "phrases"], None, "style[1].phrases: must be a non-empty list"),
    (["responses", "offer"], "I can help instead.", "responses.offer: must contain {alternative} exactly once"),
    (["responses", "refuse"], [], "responses.refuse: must be a non-empty list"),
    (["version"], "one", "version: must be an integer"),
    (["categories"], [], "categories: must be a non-empty list"),
    (["nmae"], "x", "unknown key 'nmae'"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[m.split(":")[0] for _, _, m in BAD])
def test_bad_spec_names_the_field(tiny_raw, path, value, message):
    with pytest.raises(SpecError) as err:
        parse_spec(mutate(tiny_raw, path, value), source="tiny_spec.yaml")
    assert str(err.value).startswith("tiny_spec.yaml: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_paths(tmp_path, monkeypatch):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"^broken\.yaml: not valid YAML"):
        load_spec(bad)
    with pytest.raises(FileNotFoundError, match="conf/safety/tiny_spec.yaml"):
        resolve_spec_path("conf/safety/nope.yaml")
    monkeypatch.chdir(tmp_path)  # a relative path falls back to the repository root
    assert resolve_spec_path(TINY_SPEC) == ROOT / TINY_SPEC
    assert load_spec(TINY_SPEC).name == "tiny"


def test_spec_text_carries_every_category_and_rule():
    for path in (TINY_SPEC, TEMPLATE_SPEC):
        spec = load_spec(path)
        text = spec_text(spec)
        for c in spec.categories:
            assert f"{c.id}: " in text and c.rule in text and f"Expected response: {c.response}" in text
        assert all(r.rule in text for r in spec.style)
