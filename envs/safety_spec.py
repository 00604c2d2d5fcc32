"""The safety spec: a written policy as data (YAML), loaded and validated with errors naming the field.

What
- `load_spec(path)` -> `Spec`: categories, each with the expected response type (`comply`,
  `refuse`, `safe_complete`), a citable rule, an optional safe alternative and examples; style rules
  (`brief_refusal`, `no_lecturing`, `offer_alternative`, ...), each with the response types it
  applies to and how it can be checked. Two specs ship: `conf/safety/tiny_spec.yaml` (the tiny
  world: a closed request `grammar` per category and a closed `responses` language) and
  `conf/safety/spec_template.yaml` (a realistic template for real models, read by LLM judges).
- A bad spec fails at load with `SpecError`, one line naming the file and the field:
  `tiny_spec.yaml: categories[3].response: 'maybe' is not one of comply, refuse, safe_complete`.
  Unknown keys, missing fields, duplicate ids, a `look_alike` that names no category, a template
  slot without fillers and (closed specs) a request that two categories would both produce are all
  errors.
- `Spec.requests()` expands a closed spec's grammar: every request with its category and slot
  values; `Spec.classify(prompt)` is the inverse (which category produced this request).
- `resolve_spec_path(path)`: a relative path is looked up from the working directory, then from the
  repository root, so `conf/safety/tiny_spec.yaml` works from anywhere.

Format (see the two YAML files for full examples):

    name: tiny
    version: 1
    summary: one paragraph the judge and the traces can quote
    style:
      - {id: brief_refusal, rule: "...", applies_to: [refuse], check: max_words, max_words: 8}
    responses: {refuse: ["I can't help with that."], safe_complete: ["..."], offer: "I can {alternative} instead."}
    openers: ["", "Quick question: "]
    categories:
      - id: hacking
        description: ...
        response: refuse            # comply | refuse | safe_complete
        rule: "H1: ..."             # cited by the SFT traces
        alternative: "explain how to secure your own {target}"   # optional; may use slot names
        look_alike: account_security                               # optional benign twin
        answer: "..."               # comply categories of a closed spec: the compliant answer
        safe_completion: "..."      # safe_complete categories of a closed spec
        grammar: {templates: ["How do I {hack} {owner} {target}?"], slots: {hack: [...], ...}}
        examples: [{prompt: "...", response: "..."}]

Style `check` kinds: `max_words` (words outside the offer sentence), `forbidden_phrases`
(case-insensitive substrings), `offer_alternative` (the category's alternative in the `offer` form),
`include_safe_completion` (the category's safe completion), `judge_only` (prose for an LLM judge).
"""
from __future__ import annotations

import functools
import itertools
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESPONSE_TYPES = ("comply", "refuse", "safe_complete")
CHECKS = ("max_words", "forbidden_phrases", "offer_alternative", "include_safe_completion", "judge_only")
ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = "conf/safety/tiny_spec.yaml"
TEMPLATE_SPEC = "conf/safety/spec_template.yaml"


class SpecError(ValueError):
    """A bad spec; the message names the file and the field."""


@dataclass
class StyleRule:
    id: str
    rule: str  # the text the judge and the traces quote
    applies_to: tuple[str, ...]  # response types it constrains
    check: str  # one of CHECKS
    max_words: int | None = None  # check == max_words
    phrases: tuple[str, ...] = ()  # check == forbidden_phrases (lower case)


@dataclass
class Grammar:
    templates: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]

    def expand(self) -> list[tuple[str, dict[str, str]]]:
        """Every (request, slot values) of this grammar, in a fixed order."""
        out = []
        for template in self.templates:
            names = _placeholders(template)
            for values in itertools.product(*(self.slots[n] for n in names)):
                filled = dict(zip(names, values))
                out.append((template.format(**filled), filled))
        return out


@dataclass
class Example:
    prompt: str
    response: str


@dataclass
class Category:
    id: str
    description: str
    response: str  # the expected response type
    rule: str
    alternative: str | None = None
    look_alike: str | None = None
    answer: str | None = None
    safe_completion: str | None = None
    grammar: Grammar | None = None
    examples: tuple[Example, ...] = ()


@dataclass
class Responses:
    """A closed spec's response language: how a refusal / safe completion begins, the offer form."""

    refuse: tuple[str, ...]
    safe_complete: tuple[str, ...]
    offer: str  # contains "{alternative}"


@dataclass
class Spec:
    name: str
    version: int
    summary: str
    style: tuple[StyleRule, ...]
    categories: tuple[Category, ...]
    responses: Responses | None = None
    openers: tuple[str, ...] = ("",)
    path: str | None = None
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def closed(self) -> bool:
        """A tiny-world spec: every category has a grammar and the responses are a closed language."""
        return self.responses is not None

    def category(self, cid: str) -> Category:
        for c in self.categories:
            if c.id == cid:
                return c
        raise KeyError(f"spec {self.name!r} has no category {cid!r}; categories: {', '.join(self.ids())}")

    def ids(self) -> list[str]:
        return [c.id for c in self.categories]

    def rules_for(self, response: str) -> list[StyleRule]:
        return [r for r in self.style if response in r.applies_to]

    def requests(self) -> list[tuple[str, Category, dict[str, str]]]:
        """Every request of a closed spec: (text, category, slot values), openers applied."""
        if not self.closed:
            raise ValueError(f"spec {self.name!r} has no request grammar (only closed specs do)")
        return [(opener + text, c, slots) for c in self.categories for text, slots in c.grammar.expand()
                for opener in self.openers]

    def classify(self, prompt: str) -> tuple[Category, dict[str, str]] | None:
        """The category (and slot values) whose grammar produces `prompt`; None outside the grammar."""
        if not self._index:
            self._index.update({normalize(t): (c, s) for t, c, s in self.requests()})
        return self._index.get(normalize(prompt))

    def alternative_for(self, category: Category, slots: dict[str, str]) -> str | None:
        return None if category.alternative is None else category.alternative.format(**slots)


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form of a request or answer."""
    return " ".join(text.split()).lower()


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def resolve_spec_path(path: str | Path) -> Path:
    """`path` as given if it exists (absolute, or relative to the working directory), else relative to
    the repository root; FileNotFoundError naming both places otherwise."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    if not p.is_absolute() and (ROOT / p).is_file():
        return ROOT / p
    raise FileNotFoundError(f"safety spec {str(path)!r} not found (looked in {Path.cwd()} and {ROOT}); "
                            f"the shipped specs are {TINY_SPEC} and {TEMPLATE_SPEC}")


@functools.lru_cache(maxsize=16)
def _load_cached(path: str) -> Spec:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{p.name}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_spec(raw, source=p.name, path=str(p))


def load_spec(path: str | Path = TINY_SPEC) -> Spec:
    """The validated spec at `path` (cached per resolved path; treat it as read-only)."""
    return _load_cached(str(resolve_spec_path(path)))


# --------------------------------------------------------------------------- validation


class _Fields:
    """Typed reads from one mapping of the raw YAML, each failure naming `where.key`."""

    def __init__(self, raw: Any, where: str, source: str, allowed: tuple[str, ...]):
        self.source, self.where = source, where
        if not isinstance(raw, dict):
            self.fail(where, f"must be a mapping, got {type(raw).__name__}")
        unknown = [k for k in raw if k not in allowed]
        if unknown:
            self.fail(where, f"unknown key {unknown[0]!r}; valid keys: {', '.join(allowed)}")
        self.raw = raw

    def fail(self, key: str, what: str):
        raise SpecError(f"{self.source}: {key}: {what}")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                self.fail(self.key(name), "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(self.key(name), f"must be a non-empty string, got {value!r}")
        return value.strip()

    def texts(self, name: str, required: bool = True, allow_empty_items: bool = False) -> tuple[str, ...]:
        value = self.raw.get(name)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or not value:
            self.fail(self.key(name), f"must be a non-empty list of strings, got {value!r}")
        for i, v in enumerate(value):
            if not isinstance(v, str) or (not allow_empty_items and not v.strip()):
                self.fail(f"{self.key(name)}[{i}]", f"must be a non-empty string, got {v!r}")
        return tuple(value)

    def one_of(self, name: str, options: tuple[str, ...]) -> str:
        value = self.raw.get(name)
        if value is None:
            self.fail(self.key(name), f"is required (one of {', '.join(options)})")
        if value not in options:
            self.fail(self.key(name), f"{value!r} is not one of {', '.join(options)}")
        return value


def parse_spec(raw: Any, source: str = "<spec>", path: str | None = None) -> Spec:
    """A `Spec` from the YAML's data; `SpecError` naming the first bad field."""
    top = _Fields(raw, "", source, ("name", "version", "summary", "style", "responses", "openers", "categories"))
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        top.fail("version", f"must be an integer, got {version!r}")
    style = tuple(_style(r, f"style[{i}]", source) for i, r in enumerate(_list(raw, "style", source)))
    _unique([r.id for r in style], "style", source)
    responses = None if raw.get("responses") is None else _responses(raw["responses"], source)
    openers = top.texts("openers", required=False, allow_empty_items=True) or ("",)
    categories = tuple(_category(c, f"categories[{i}]", source, responses is not None)
                       for i, c in enumerate(_list(raw, "categories", source)))
    spec = Spec(name=top.text("name"), version=version, summary=top.text("summary"), style=style,
                categories=categories, responses=responses, openers=openers, path=path)
    _cross_checks(spec, source)
    return spec


def _list(raw: dict, name: str, source: str) -> list:
    value = raw.get(name)
    if not isinstance(value, list) or not value:
        raise SpecError(f"{source}: {name}: must be a non-empty list, got {value!r}")
    return value


def _unique(ids: list[str], where: str, source: str) -> None:
    seen = set()
    for i, x in enumerate(ids):
        if x in seen:
            raise SpecError(f"{source}: {where}[{i}].id: {x!r} is already used by an earlier entry")
        seen.add(x)


def _style(raw: Any, where: str, source: str) -> StyleRule:
    f = _Fields(raw, where, source, ("id", "rule", "applies_to", "check", "max_words", "phrases"))
    applies = f.texts("applies_to")
    for i, a in enumerate(applies):
        if a not in RESPONSE_TYPES:
            f.fail(f"{where}.applies_to[{i}]", f"{a!r} is not one of {', '.join(RESPONSE_TYPES)}")
    check = f.one_of("check", CHECKS)
    max_words = raw.get("max_words")
    if check == "max_words" and (not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1):
        f.fail(f"{where}.max_words", f"must be a positive integer for check max_words, got {max_words!r}")
    phrases = f.texts("phrases", required=check == "forbidden_phrases")
    return StyleRule(id=f.text("id"), rule=f.text("rule"), applies_to=applies, check=check,
                     max_words=max_words, phrases=tuple(p.lower() for p in phrases))


def _responses(raw: Any, source: str) -> Responses:
    f = _Fields(raw, "responses", source, ("refuse", "safe_complete", "offer"))
    offer = f.text("offer")
    if _placeholders(offer) != ["alternative"]:
        f.fail("responses.offer", f"must contain {{alternative}} exactly once, got {offer!r}")
    return Responses(refuse=f.texts("refuse"), safe_complete=f.texts("safe_complete"), offer=offer)


def _category(raw: Any, where: str, source: str, closed: bool) -> Category:
    keys = ("id", "description", "response", "rule", "alternative", "look_alike", "answer", "safe_completion",
            "grammar", "examples")
    f = _Fields(raw, where, source, keys)
    response = f.one_of("response", RESPONSE_TYPES)
    grammar = None
    if raw.get("grammar") is not None:
        grammar = _grammar(raw["grammar"], f"{where}.grammar", source)
    elif closed:
        f.fail(f"{where}.grammar", "is required: this spec has `responses`, so it is a closed (tiny-world) spec")
    examples = tuple(_example(e, f"{where}.examples[{i}]", source) for i, e in enumerate(raw.get("examples") or []))
    cat = Category(id=f.text("id"), description=f.text("description"), response=response, rule=f.text("rule"),
                   alternative=f.text("alternative", required=False), look_alike=f.text("look_alike", required=False),
                   answer=f.text("answer", required=False), safe_completion=f.text("safe_completion", required=False),
                   grammar=grammar, examples=examples)
    if closed and response == "comply" and cat.answer is None:
        f.fail(f"{where}.answer", "is required for a comply category of a closed spec (the compliant answer)")
    if closed and response == "safe_complete" and cat.safe_completion is None:
        f.fail(f"{where}.safe_completion", "is required for a safe_complete category of a closed spec")
    slots = set(grammar.slots) if grammar else set()
    for name in ("alternative", "answer", "safe_completion"):
        text = getattr(cat, name)
        unknown = [p for p in _placeholders(text or "") if p not in slots]
        if unknown:
            f.fail(f"{where}.{name}", f"uses {{{unknown[0]}}}, which is not a slot of this category's grammar")
    return cat


def _grammar(raw: Any, where: str, source: str) -> Grammar:
    f = _Fields(raw, where, source, ("templates", "slots"))
    templates = f.texts("templates")
    slots_raw = raw.get("slots") or {}
    if not isinstance(slots_raw, dict):
        f.fail(f"{where}.slots", f"must be a mapping of slot name to fillers, got {slots_raw!r}")
    slots = {}
    for name, fillers in slots_raw.items():
        if not isinstance(fillers, list) or not fillers or not all(isinstance(x, str) and x.strip() for x in fillers):
            f.fail(f"{where}.slots.{name}", f"must be a non-empty list of non-empty strings, got {fillers!r}")
        slots[name] = tuple(dict.fromkeys(fillers))
    used = set()
    for i, t in enumerate(templates):
        for name in _placeholders(t):
            if name not in slots:
                f.fail(f"{where}.templates[{i}]", f"uses {{{name}}}, which is not in {where}.slots")
            used.add(name)
    for name in slots:
        if name not in used:
            f.fail(f"{where}.slots.{name}", "is used by no template")
    return Grammar(templates=templates, slots=slots)


def _example(raw: Any, where: str, source: str) -> Example:
    f = _Fields(raw, where, source, ("prompt", "response"))
    return Example(prompt=f.text("prompt"), response=f.text("response"))


def _cross_checks(spec: Spec, source: str) -> None:
    _unique(spec.ids(), "categories", source)
    ids = set(spec.ids())
    for i, c in enumerate(spec.categories):
        if c.look_alike is not None and c.look_alike not in ids:
            raise SpecError(f"{source}: categories[{i}].look_alike: {c.look_alike!r} is not a category id; "
                            f"valid: {', '.join(spec.ids())}")
        if c.look_alike == c.id:
            raise SpecError(f"{source}: categories[{i}].look_alike: a category cannot be its own look-alike")
    if spec.closed:
        owner: dict[str, str] = {}
        for text, c, _ in spec.requests():
            other = owner.setdefault(normalize(text), c.id)
            if other != c.id:
                i = spec.ids().index(c.id)
                raise SpecError(f"{source}: categories[{i}].grammar: produces {text!r}, which category "
                                f"{other!r} produces too; a request must have one category")


def spec_text(spec: Spec) -> str:
    """The spec as prose for an LLM judge or a spec-in-context prompt: summary, categories with their
    expected response, rule, alternative and examples, then the style rules."""
    lines = [f"# Safety specification: {spec.name} (version {spec.version})", "", spec.summary, "",
             "Response types: comply (answer fully), refuse (decline), safe_complete (give only the safe, "
             "helpful part, e.g. support and resources).", "", "## Categories"]
    for c in spec.categories:
        lines.append(f"- {c.id}: {c.description}. Expected response: {c.response}. Rule {c.rule}")
        if c.alternative:
            lines.append(f"  Safe alternative to offer: {c.alternative}.")
        if c.look_alike:
            lines.append(f"  Look-alike category: {c.look_alike}.")
        for e in c.examples:
            lines.append(f"  Example: {e.prompt!r} -> {e.response!r}")
    lines += ["", "## Style rules"]
    lines += [f"- {r.id} (for {', '.join(r.applies_to)}): {r.rule}" for r in spec.style]
    return "\n".join(lines)
