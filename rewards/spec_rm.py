"""The spec-conditioned reward model: a tiny transformer classifier that reads the spec's clause for a
request's category, the request and a final answer, and gives the verdict RuleJudge would.

What
- Data: rewards/spec_rm_data.py (judge-labelled examples under perturbed specs; held out by request
  and by (category, expected response) pair). The model's input is one sequence
  `[CLS] clause [SEP] request: ... [SEP] answer: ...` (answer last, so truncation cuts the answer's
  tail, never the clause); its output one of `LABELS` (response type x disallowed/allowed/style slip).
- Model: `BertForSequenceClassification` at a tiny size (`RMConfig`) with a word-level tokenizer built
  here with `tokenizers` from the training texts (lower case, words and punctuation; unseen words map
  to [UNK]). Trained by `transformers.Trainer` (cross-entropy over LABELS), not TRL's RewardTrainer:
  RewardTrainer fits a scalar Bradley-Terry score from chosen/rejected pairs, but the judge protocol
  returns a verdict (response type given, allowed, style), which a classifier gives directly; TRL
  1.16 has no classification trainer of its own.
- `SpecRMJudge(checkpoint)`: the judge protocol (`judge(spec, requests) -> list[Verdict]`), registered
  in rewards/safety.py as `judge: spec_rm` (`reward.terms.safety.checkpoint=<dir>`). The category
  comes from the closed spec's grammar (as RuleJudge's), the clause from the spec it is handed, the
  verdict from the model: change a category's `response` in the spec and the clause the model reads
  changes, so its verdicts change (tests/rewards/test_spec_rm.py measures the flip rate). Never raises
  on an answer: an empty one is a failed verdict, a huge one is cut to `max_answer_chars`.
- `python -m rewards.spec_rm --out runs/spec_rm` trains (three members, `RMConfig.members`, their averaged
  probabilities the verdict; ~2.5 minutes on 2 idle cores), saves the checkpoint and prints held-out
  accuracy against RuleJudge and the spec-flip rates (metrics.json).

Departures: Guan et al. 2024 / the gpt-oss card use an LLM reading the whole spec. This model reads
only its category's clause and gets the category from the grammar, so it needs a closed spec; an open
spec gives failed verdicts (use `judge: http`). A style slip is reported as `style_ok=False` without
the rule id (`violations=("style",)`): the model is not trained to name the rule.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from envs.safety_spec import TINY_SPEC, Spec, load_spec, normalize
from envs.safety_tasks import split_of
from rewards.judge import JudgeRequest, RuleJudge, Verdict, failure
from rewards.spec_rm_data import (LABELS, RMExample, candidates, clause_text, held_out_types, make_examples,
                                  with_responses)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


@dataclass
class RMConfig:
    hidden: int = 64  # model width
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    max_length: int = 128  # tokens; a longer input loses the end of its answer
    n_train: int = 6_000  # training examples (each under its own perturbed spec); 4000: 92.0% full label at seeds 0-2, 6000: 96.1%
    n_test: int = 1_000  # held-out examples (held-out requests; the spec itself or held-out pairs)
    epochs: float = 3.0
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    # independently trained members (member i: data and init seed `seed + i`), their probabilities
    # averaged: single models at seeds 0 / 1 / 2 scored 97.7 / 97.0 / 93.6% full label, ensembles at --seed
    # 0 / 1 / 2 97.4 / 97.3 / 98.8% (bench/RESULTS.md "Spec-conditioned reward model")
    members: int = 3


def rm_text(clause: str, request: str, answer: str) -> str:
    return f"{clause} [SEP] request: {request} [SEP] answer: {answer}"


def build_tokenizer(texts: Sequence[str]):
    """A word-level fast tokenizer over `texts` (lower case; words and punctuation runs are tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[(s, tok.token_to_id(s)) for s in SPECIALS[2:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=10_000)


def build_model(cfg: RMConfig, vocab_size: int, pad_id: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(cfg.seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden,
                        max_position_embeddings=cfg.max_length, pad_token_id=pad_id, num_labels=len(LABELS),
                        id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)},
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _encode(tokenizer, examples: Sequence[RMExample], max_length: int) -> list[dict]:
    enc = tokenizer([rm_text(e.clause, e.request, e.answer) for e in examples], truncation=True,
                    max_length=max_length)
    return [{"input_ids": ids, "attention_mask": m, "labels": e.label}
            for ids, m, e in zip(enc["input_ids"], enc["attention_mask"], examples)]


def member_dir(out_dir: str | Path, i: int) -> Path:
    return Path(out_dir) / f"member_{i}"


def train_spec_rm(spec: Spec, out_dir: str | Path, cfg: RMConfig = RMConfig()) -> Path:
    """Train `cfg.members` classifiers (one: into `out_dir`; more: into `out_dir/member_<i>`, each on its own
    data and initialisation) and save them with `rm_config.json`, which `SpecRMJudge` loads."""
    if cfg.members < 1:
        raise ValueError(f"members={cfg.members}: train at least one model")
    if cfg.members == 1:
        return _train_one(spec, out_dir, cfg)
    for i in range(cfg.members):  # member i at seed + i: `--seed 0` is the single models of seeds 0, 1, 2
        _train_one(spec, member_dir(out_dir, i), replace(cfg, seed=cfg.seed + i, members=1))
    out = Path(out_dir)
    (out / "rm_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return out


def _train_one(spec: Spec, out_dir: str | Path, cfg: RMConfig) -> Path:
    """Generate the data, train one classifier with transformers.Trainer, save model + tokenizer + config."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    train = make_examples(spec, "train", cfg.n_train, cfg.seed)
    corpus = [rm_text(e.clause, e.request, e.answer) for e in train]
    corpus += [clause_text(with_responses(spec, {c.id: t}), c) for c in spec.categories
               for t in ("comply", "refuse", "safe_complete")]  # held-out clauses' words are spec words, not unseen
    tokenizer = build_tokenizer(corpus)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.pad_token_id)
    out = Path(out_dir)
    args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=cfg.epochs,
                             per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                             warmup_steps=0.05, weight_decay=0.01, lr_scheduler_type="cosine", logging_steps=50,
                             save_strategy="no", report_to=[], use_cpu=True, seed=cfg.seed,
                             dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_encode(tokenizer, train, cfg.max_length),
            data_collator=DataCollatorWithPadding(tokenizer)).train()
    return save_checkpoint(model, tokenizer, cfg, out)


def save_checkpoint(model, tokenizer, cfg: RMConfig, out_dir: str | Path) -> Path:
    """What SpecRMJudge loads: the model, its tokenizer and `rm_config.json`."""
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "rm_config.json").write_text(json.dumps(asdict(replace(cfg, members=1)), indent=1))  # one model here
    return out


class SpecRMJudge:
    """The trained reward model as a judge (see the module docstring)."""

    def __init__(self, checkpoint: str, batch_size: int = 64, max_answer_chars: int = 2000):
        from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

        path = Path(checkpoint)
        cfg_file = path / "rm_config.json"
        members = json.loads(cfg_file.read_text()).get("members", 1) if cfg_file.is_file() else 1
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"spec_rm checkpoint {checkpoint!r}: rm_config.json members={members!r}, need an int >= 1")
        paths = [path] if members == 1 else [member_dir(path, i) for i in range(members)]
        missing = [str(p) for p in paths if not (p / "config.json").is_file() or not (p / "rm_config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"spec_rm checkpoint {checkpoint!r}: no model in {missing} (config.json and "
                                    "rm_config.json); train one with `python -m rewards.spec_rm --out <dir>` and "
                                    "pass checkpoint=<dir>")
        self.members = [(PreTrainedTokenizerFast.from_pretrained(p),
                         AutoModelForSequenceClassification.from_pretrained(p).eval(),
                         json.loads((p / "rm_config.json").read_text())["max_length"]) for p in paths]
        self.batch_size, self.max_answer_chars = batch_size, max_answer_chars

    def judge(self, spec: Spec, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        if not spec.closed:
            return [failure(f"SpecRMJudge needs a closed spec (it finds the category by the request grammar); "
                            f"{spec.name!r} is open: use an LLM judge (judge: http)")] * len(requests)
        out: list[Verdict | None] = [None] * len(requests)
        todo = []  # (index, category, text)
        for i, req in enumerate(requests):
            hit = spec.classify(req.prompt or "")
            final = (req.final or "")[: self.max_answer_chars]
            if hit is None:
                out[i] = failure(f"request {str(req.prompt)[:80]!r} is outside the request grammar of spec "
                                 f"{spec.name!r}")
            elif not normalize(final):
                out[i] = failure("empty final answer")
            else:
                todo.append((i, hit[0], rm_text(clause_text(spec, hit[0]), req.prompt, final)))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            for (i, cat, _), label in zip(chunk, self._predict([t for _, _, t in chunk])):
                rtype, outcome = LABELS[label].split("/")
                out[i] = Verdict(rtype, cat.id, allowed=outcome != "disallowed", style_ok=outcome != "style_slip",
                                 violations=("style",) if outcome == "style_slip" else (), expected=cat.response)
        return out

    @torch.no_grad()
    def _predict(self, texts: list[str]) -> list[int]:
        """The label with the highest probability averaged over the members."""
        probs = 0.0
        for tokenizer, model, max_length in self.members:
            enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            probs = probs + model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.softmax(-1)
        return probs.argmax(-1).tolist()  # (B, LABELS) -> B


# --------------------------------------------------------------------------- measurement


def agreement(judge, spec: Spec, examples: Sequence[RMExample]) -> dict[str, float]:
    """Accuracy of `judge` against the examples' RuleJudge labels: the full label, and `allowed` alone
    (the sign of the score), overall and on clauses never seen in training (`novel`)."""
    groups: dict[tuple[str, str], list[RMExample]] = {}
    for e in examples:
        groups.setdefault((e.category, e.expected), []).append(e)
    rows = []  # (example, verdict)
    for (cid, expected), group in groups.items():
        sub = with_responses(spec, {cid: expected})
        rows += zip(group, judge.judge(sub, [JudgeRequest(e.request, e.answer) for e in group]))

    def acc(pairs, full: bool) -> float:
        ok = [(LABELS[e.label] == f"{v.response_type}/{_outcome(v)}") if full else
              (LABELS[e.label].endswith("/disallowed") != v.allowed) for e, v in pairs if not v.failed]
        return sum(ok) / max(len(pairs), 1)

    novel = [(e, v) for e, v in rows if e.novel]
    return {"n": len(rows), "accuracy": acc(rows, True), "allowed_accuracy": acc(rows, False),
            "n_novel": len(novel), "novel_accuracy": acc(novel, True), "novel_allowed_accuracy": acc(novel, False)}


def _outcome(v: Verdict) -> str:
    return "disallowed" if not v.allowed else "allowed" if v.style_ok else "style_slip"


def flip_rates(judge, spec: Spec, to: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Per category: flip its expected response (default: to its held-out type, never seen in training)
    and judge every held-out request of it with every candidate answer under both specs. `flip` = of the
    pairs whose RuleJudge `allowed` changes, the share whose `judge` `allowed` changes too; `stay` = of
    the other categories' pairs, the share whose verdict does not change."""
    to = to or held_out_types(spec)
    rows = [(t, c, s) for t, c, s in spec.requests() if split_of(t) == "test"]
    reqs = {cid: [JudgeRequest(t, a) for t, c, s in rows if c.id == cid for a in candidates(spec, c, s)]
            for cid in to}
    base = {cid: judge.judge(spec, r) for cid, r in reqs.items()}
    rule_base = {cid: RuleJudge().judge(spec, r) for cid, r in reqs.items()}
    out = {}
    for cid, target in to.items():
        flipped = with_responses(spec, {cid: target})
        rule_new, new = RuleJudge().judge(flipped, reqs[cid]), judge.judge(flipped, reqs[cid])
        changed = [j for j, (a, b) in enumerate(zip(rule_base[cid], rule_new)) if a.allowed != b.allowed]
        follow = sum(base[cid][j].allowed != new[j].allowed for j in changed)
        other = random.Random(cid).choice([c for c in to if c != cid])
        stay = judge.judge(flipped, reqs[other])
        same = sum(a.allowed == b.allowed for a, b in zip(base[other], stay))
        out[cid] = {"to": target, "n_changed": len(changed), "flip": follow / max(len(changed), 1),
                    "stay": same / max(len(stay), 1)}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=TINY_SPEC)
    ap.add_argument("--out", default="runs/spec_rm")
    for name, value in asdict(RMConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    spec = load_spec(args.spec)
    cfg = RMConfig(**{k: getattr(args, k) for k in asdict(RMConfig())})
    out = train_spec_rm(spec, args.out, cfg)
    judge = SpecRMJudge(str(out))
    report = {"held_out": agreement(judge, spec, make_examples(spec, "test", cfg.n_test, cfg.seed)),
              "flip": flip_rates(judge, spec)}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
