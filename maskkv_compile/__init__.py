"""maskkv_compile: MaskKV prompt-KV eviction for diffusion LLMs, as a torch.compile pass.

    model = maskkv_compile.optimize(model, budget=256)
    out = model.generate(prompt_ids, gen_length=128, steps=128, block_length=32)

    compiled = torch.compile(model, backend="maskkv", options={"budget": 256, "mask_token_id": 126336})
    maskkv_compile.runtimes(compiled)   # the MaskKV runtimes that ran for it
"""

from maskkv_compile.api import MaskKVModel, optimize
from maskkv_compile.backend import runtimes
from maskkv_compile.calibrate import calibrate
from maskkv_compile.config import MaskKVConfig, MaskKVConfigError, Revote
from maskkv_compile.explain import explain
from maskkv_compile.passes import UnsupportedModelError
from maskkv_compile.policies import (
    AdaKV, AllVoting, MaskKV, MaskVotingUniform, Policy, PromptVoting, PyramidKV, Random, SnapKV, SqueezeAttention,
    StreamingLLM,
)
from maskkv_compile.profile import LayerProfile, ProfileMismatchError
from maskkv_compile.runtime import NoMaskTokenError, response_logits_only

__all__ = [
    "LayerProfile", "MaskKVConfig", "MaskKVConfigError", "MaskKVModel", "NoMaskTokenError", "ProfileMismatchError",
    "UnsupportedModelError", "calibrate", "explain", "optimize", "response_logits_only",
    "runtimes", "Revote", "Policy", "MaskKV", "MaskVotingUniform", "SnapKV", "PromptVoting", "AllVoting", "StreamingLLM",
    "Random", "PyramidKV", "SqueezeAttention", "AdaKV",
]
__version__ = "0.1.0"
