"""The rollout engine's GPU options (no vLLM started): `rollout.quantization=mxfp4` refuses what would
not serve the released 4-bit experts as such."""
import json

import pytest

from rl.config import RolloutConfig
from rl.engine import _check_mxfp4_serving


def _folder(tmp_path, quant):
    cfg = {"model_type": "gpt_oss"} | ({"quantization_config": {"quant_method": quant}} if quant else {})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.mark.parametrize("quant, on_cpu, dtype, message", [
    (None, False, "bfloat16", "is not a released-style MXFP4 folder"),
    ("mxfp4", True, "bfloat16", "needs a GPU and rollout.dtype=bfloat16"),
    ("mxfp4", False, "float32", "needs a GPU and rollout.dtype=bfloat16"),
])
def test_mxfp4_serving_is_refused_where_the_experts_would_be_decoded(tmp_path, quant, on_cpu, dtype, message):
    with pytest.raises(ValueError, match=message):
        _check_mxfp4_serving(_folder(tmp_path, quant), RolloutConfig(quantization="mxfp4", dtype=dtype), on_cpu)


def test_mxfp4_serving_on_a_gpu_in_bf16_is_accepted(tmp_path):
    _check_mxfp4_serving(_folder(tmp_path, "mxfp4"), RolloutConfig(quantization="mxfp4", dtype="bfloat16"), False)
