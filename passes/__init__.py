"""FX passes of maskkv_compile (installed as ``maskkv_compile.passes``), one a file.

Order (see ``maskkv_compile.pipeline``):

    canonical:  FindAttentionPass       every attention spelling -> maskkv::attention
    prefill:    MaskPaddingPass         padding keys out of every maskkv::attention
                CaptureVotesPass        maskkv::mask_votes at every site
                EvictKVPass             maskkv::select_kv, kept K/V become graph outputs
                ShardBudgetsPass        (tensor parallelism) head budgets from every rank's heads
                MaskOnlyHeadPass        LM head on the response rows only
                PruneTailRowsPass       the layers after the last attention on those rows only
    step:       SliceSequencePass       token ids / positions / tables gathered at resp_idx
                CachedAttentionPass     maskkv::cached_attention over [kept ; response]
                ResponseKVOutputsPass   (block_length only) each layer's response K/V as outputs
    with revote (maskkv_compile/revote.py):
    prefill:    KeepPromptKVPass        (after EvictKVPass) each layer's prompt K/V as outputs
    revote:     the step passes, then RevoteKVPass   maskkv::revote_kv before each cached attention
"""

from .base import GraphPass, PassManager, PassResult
from .cached_attention import STEP_INPUTS_PER_LAYER, CachedAttentionPass
from .capture_votes import CaptureVotesPass
from .evict_kv import PREFILL_OUTPUTS_PER_LAYER, EvictKVPass
from .find_attention import AttentionSite, FindAttentionPass, attention_sites
from .graph_info import GraphInfo, UnsupportedModelError, analyse
from .keep_prompt_kv import PROMPT_KV_OUTPUTS_PER_LAYER, KeepPromptKVPass
from .mask_only_head import MaskOnlyHeadPass
from .mask_padding import MaskPaddingPass
from .prune_tail_rows import PruneTailRowsPass
from .response_kv_outputs import RESPONSE_KV_OUTPUTS_PER_LAYER, ResponseKVOutputsPass
from .revote_kv import REVOTE_OUTPUTS_PER_LAYER, RevoteKVPass
from .shard_budgets import ShardBudgetsPass
from .slice_sequence import SliceSequencePass

__all__ = [
    "AttentionSite",
    "CachedAttentionPass",
    "CaptureVotesPass",
    "EvictKVPass",
    "FindAttentionPass",
    "GraphInfo",
    "GraphPass",
    "KeepPromptKVPass",
    "MaskOnlyHeadPass",
    "MaskPaddingPass",
    "PassManager",
    "PassResult",
    "PruneTailRowsPass",
    "PREFILL_OUTPUTS_PER_LAYER",
    "PROMPT_KV_OUTPUTS_PER_LAYER",
    "RESPONSE_KV_OUTPUTS_PER_LAYER",
    "REVOTE_OUTPUTS_PER_LAYER",
    "ResponseKVOutputsPass",
    "RevoteKVPass",
    "ShardBudgetsPass",
    "STEP_INPUTS_PER_LAYER",
    "SliceSequencePass",
    "UnsupportedModelError",
    "analyse",
    "attention_sites",
]
