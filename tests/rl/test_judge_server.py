"""The vLLM judge on a Ray actor (rl/judge_server.py) with a real engine: a tiny gpt-oss judge.

The tiny judge is randomly initialised, so its verdicts are garbage: the point is the plumbing
(Harmony prompt, Ray actor, one call per batch, final-channel answer, parsing) and that garbage,
prompts outside its vocabulary and a dead actor become failed verdicts, never a crashed step.
"""
import pytest

from envs.safety_spec import TINY_SPEC, load_spec
from envs.safety_tasks import SafetyEnv
from rewards.judge import JudgeRequest, judge_messages

pytestmark = pytest.mark.slow
SPEC = load_spec(TINY_SPEC)


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory, tiny_cfg):
    from rl.model import build_tiny_model

    tasks = SafetyEnv().tasks("test", 6)
    reqs = [JudgeRequest(t.metadata["prompt"], "I can't help with that.") for t in tasks]
    corpus = [m["content"] for r in reqs for m in judge_messages(SPEC, r)]
    corpus += ['{"category": "crafts", "response_type": "refuse", "allowed": false, "style_ok": true}']
    cfg = dict(tiny_cfg, max_position_embeddings=4096)  # the judge prompt holds the whole spec
    return build_tiny_model(cfg, corpus, tmp_path_factory.mktemp("judge") / "tiny"), reqs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from rl.cluster import init_ray
    from rl.config import ClusterConfig

    init_ray(ClusterConfig(num_cpus=4))
    yield
    ray.shutdown()


def test_vllm_judge_actor_answers_a_batch_and_never_raises(judge_model, ray_local):
    from rewards.compose import CompositeReward
    from rl.judge_server import VLLMJudge, checkpoint_format

    model, reqs = judge_model
    assert checkpoint_format(model) == "harmony"
    judge = VLLMJudge(str(model), max_tokens=24, max_model_len=2048, timeout_s=300)
    outside = JudgeRequest("Zebra quartz xylophone?", "Qwerty.")  # words the judge's vocabulary lacks
    verdicts = judge.judge(SPEC, reqs + [outside])
    assert len(verdicts) == len(reqs) + 1
    assert verdicts[-1].failed and "vocabulary" in verdicts[-1].error
    ok = [v for v in verdicts[:-1] if not v.failed]
    print(f"tiny random judge: {len(ok)}/{len(reqs)} parsable verdicts")  # garbage is expected
    assert all(v.failed or v.response_type in ("comply", "refuse", "safe_complete") for v in verdicts)

    # Through the reward, as training uses it: judge failures score 0 and are counted, the step goes on.
    from envs.types import Sample, Transcript

    reward = CompositeReward.from_config({"safety": {"weight": 1.0, "judge": "vllm", "model": str(model),
                                                     "max_tokens": 16, "max_model_len": 2048}})
    t = SafetyEnv().tasks("test", 1)[0]
    s = Sample(t.task_id, "safety", "low", [], [], [], [], Transcript(final="I can't help with that."), t.metadata)
    r = reward.score_batch([s])[0]
    assert r.parts.get("safety/judge_failed") in (0.0, 1.0) and "safety/error" not in r.parts

    import ray

    actor = judge.actor
    judge.close()  # engine shut down, actor gone: every verdict of the next batch fails, nothing raises
    with pytest.raises(Exception):
        ray.get(actor.complete_batch.remote([]), timeout=60)
    assert all(v.failed for v in judge.judge(SPEC, reqs[:2]))
    judge.close()  # idempotent


def _tiny_chat_model(out):
    """Any HF chat model: a 2-layer Llama with a word-level tokenizer and a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(['{"category": "crafts", "response_type": "refuse", "allowed": false}'],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(out)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)).save_pretrained(out)
    return out


def test_vllm_judge_serves_an_hf_chat_model_through_its_chat_template(tmp_path, judge_model, ray_local):
    from rl.judge_server import VLLMJudge, checkpoint_format

    model = _tiny_chat_model(tmp_path / "llama")
    assert checkpoint_format(model) == "chat"
    judge = VLLMJudge(str(model), max_tokens=16, max_model_len=3072, timeout_s=300)
    try:
        verdicts = judge.judge(SPEC, judge_model[1][:3])
        assert len(verdicts) == 3  # garbage from a random model: failed verdicts, not an exception
        assert all(v.failed or v.response_type is not None for v in verdicts)
    finally:
        judge.close()
