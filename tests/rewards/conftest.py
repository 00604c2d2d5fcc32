"""Realistic Samples for reward tests: rendered and parsed through Harmony like real rollouts."""
import pytest

from envs.harmony import END, parse_completion, render_completion, render_prompt
from envs.types import Sample


def build_sample(final, analysis="Think.", effort="high", answer="408", question="Compute 17*24.",
                 metadata=None):
    """final=None renders an analysis message only (the model never reached the final channel)."""
    completion = render_completion(analysis, final if final is not None else "x")
    if final is None:
        completion = completion[: completion.index(END) + 1]
    meta = {"answer": answer} if answer is not None else {}
    meta.update(metadata or {})
    return Sample(
        task_id="t1", env="math", effort=effort,
        prompt_ids=render_prompt(question, effort or "medium"),
        completion_ids=completion, loss_mask=[1] * len(completion),
        behavior_logprobs=[0.0] * len(completion),
        transcript=parse_completion(completion), metadata=meta,
    )


@pytest.fixture
def make_sample():
    return build_sample
