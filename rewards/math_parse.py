"""Reading golds and final answers for math-verify, with guards against its known misreadings.

What: `parse_gold(gold)` and `parse_answer(text)` return what `math_verify.parse` returns (a list
whose first item is the value; empty when nothing was found). `rewards.math_verify_reward` calls
them inside its worker processes; they hold no state besides an LRU cache of golds.

How, and where we depart from plain `math_verify.parse` (0.9.0):
- Golds are parsed as LaTeX first. MATH-style datasets write golds as bare LaTeX (`3\\sqrt{13}`,
  `2^{10}`, `\\dfrac{3}{4}`); plain `parse` only reads LaTeX between delimiters, so it read `3\\sqrt{13}`
  as 3 and `2^{10}` as 2 (then a final "3" scored 1 and "$3\\sqrt{13}$" scored 0). A gold without
  delimiters is wrapped in `$...$`; a gold with prose words ("5 dollars") is read as plain text first.
- Mixed numbers (`4 4/9`, `-1 000 4/9`, `4 4/9%`) are rewritten to one fraction before parsing;
  math-verify read `4 4/9` as 4, so gold 4 accepted it. Malformed ones (`4 4/0`, `11 7/6`) are
  blanked so that neither of their numbers can match.
- Sentence punctuation just before a closing math delimiter is dropped: `$2^{10}.$` made the LaTeX
  parse fail, and math-verify then took the 2 out of it (gold 2 accepted it; gold 1024 did not).
- A LaTeX span that still fails to parse is masked before the plain-text extraction runs, so a number
  *inside* unsupported LaTeX (`$\\sum_{k=0}^n\\bigl(k\\bigr)$` gave 0) is never taken as the answer; an
  answer outside it is still found. A span whose content is a plain expression (`$12%$`) is kept.
Upstream Math-Verify fixed the last three after 0.9.0 (tests/test_mixed_number_extraction.py,
tests/test_failed_latex_span.py); our tests reuse their cases, the code here is our own.
"""
from __future__ import annotations

import functools
import re

from math_verify import LatexExtractionConfig, parse

_LATEX_ONLY = [LatexExtractionConfig()]
# A mixed number: whole part (optionally with space-separated thousands), blanks, proper-looking
# fraction. Not preceded by anything that makes the whole part the end of another number (11/10 4/9,
# 11.0 4/9) or a LaTeX argument; not spanning a line break (11\n5/6 are two answers).
_MIXED = re.compile(
    r"(?<![\w.,/^_{}\\])(?P<sign>[+-]?)(?P<whole>\d{1,3}(?: \d{3})+|\d+)[ \t]+(?P<num>\d+)/(?P<den>\d+)"
    r"(?![\w/]|\.\d)(?P<pct>[ \t]*(?:\\?%|percent(?:age)?\b|pct\b))?"
)
_PUNCT_BEFORE_CLOSE = re.compile(r"[.,;:!?]+(\s*)(?=\$|\\\]|\\\))")
_SPANS = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_DELIMITED = re.compile(r"(?<!\\)\$|\\\[|\\\(|\\boxed\b")
_PLAIN_EXPR = re.compile(r"[\d\s.,+\-*/%()]+")
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a word that is not a LaTeX command


def _mixed_to_fraction(m: re.Match) -> str:
    whole, num, den = int(m["whole"].replace(" ", "")), int(m["num"]), int(m["den"])
    if den == 0 or num >= den:
        return " "  # not a mixed number: neither 4 nor 0 of "4 4/0" may count as the answer
    sign = "-" if m["sign"] == "-" else ""
    return f"{sign}{whole * den + num}/{den * (100 if m['pct'] else 1)}"


def normalize(text: str) -> str:
    """Rewrite mixed numbers as fractions and drop punctuation before a closing math delimiter.

    >>> normalize("The answer is -4 4/9."), normalize("so $2^{10}.$"), normalize("4 4/0")
    ('The answer is -40/9.', 'so $2^{10}$', ' ')
    """
    return _PUNCT_BEFORE_CLOSE.sub(r"\1", _MIXED.sub(_mixed_to_fraction, text))


def _has_value(parsed: list) -> bool:
    return any(not isinstance(p, str) for p in parsed)


def _mask_failed_latex(text: str) -> str:
    """Blank every math span that LaTeX parsing cannot read (keep it if it is a plain expression)."""

    def mask(m: re.Match) -> str:
        content = next(g for g in m.groups() if g is not None)
        if _has_value(parse(f"${content}$", _LATEX_ONLY, parsing_timeout=None)):
            return m.group(0)
        return content if _PLAIN_EXPR.fullmatch(content.strip()) else " "

    return _SPANS.sub(mask, text)


def parse_answer(text: str) -> list:
    """`math_verify.parse(text)` after `normalize`, never reading a number out of failed LaTeX.

    >>> parse_answer("$2^{10}.$")[0], parse_answer("4 4/9")[0], parse_answer(r"$\\sum_{k=0}^n\\bigl(k\\bigr)$")
    (2**10, 40/9, [])
    """
    text = normalize(text)
    latex = parse(text, _LATEX_ONLY, parsing_timeout=None)
    if latex and not _has_value(latex):  # a LaTeX span was found and could not be read
        text = _mask_failed_latex(text)
    return parse(text, parsing_timeout=None) if text.strip() else []


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> list:
    """A gold answer, read as LaTeX first (MATH golds are bare LaTeX such as `3\\sqrt{13}`).

    >>> parse_gold(r"3\\sqrt{13}")[0], parse_gold("2^{10}")[0], parse_gold("1{,}234")[0]
    (3*sqrt(13), 2**10, 1234)
    """
    g = normalize(str(gold).strip())
    if _DELIMITED.search(g):
        return parse_answer(g)
    if _PROSE.search(g):  # "5 dollars": wrapped in $...$ it would read as 5*a*d*l*...
        return parse_answer(g) or parse_answer(f"${g}$")
    return parse_answer(f"${g}$")
