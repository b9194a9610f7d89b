"""FX passes of maskkv_compile (installed as ``maskkv_compile.passes``), one a file.

Order (see ``maskkv_compile.pipeline``):

    canonical:  FindAttentionPass       every attention spelling -> maskkv::attention
    prefill:    MaskPaddingPass         padding keys out of every maskkv::attention
                CaptureVotesPass        maskkv::mask_votes at every site
                EvictKVPass             maskkv::select_kv, kept K/V become graph outputs
                ShardBudgetsPass        (tensor parallelism) head budgets from every rank's heads
                MaskOnlyHeadPass        LM head on the response rows only
    step:       SliceSequencePass       token ids / positions / tables gathered at resp_idx
                CachedAttentionPass     maskkv::cached_attention over [kept ; response]
                ResponseKVOutputsPass   (block_length only) each layer's response K/V as outputs
"""

from .base import GraphPass, PassManager, PassResult
from .cached_attention import STEP_INPUTS_PER_LAYER, CachedAttentionPass
from .capture_votes import CaptureVotesPass
from .evict_kv import PREFILL_OUTPUTS_PER_LAYER, EvictKVPass
from .find_attention import AttentionSite, FindAttentionPass, attention_sites
from .graph_info import GraphInfo, UnsupportedModelError, analyse
from .mask_only_head import MaskOnlyHeadPass
from .mask_padding import MaskPaddingPass
from .response_kv_outputs import RESPONSE_KV_OUTPUTS_PER_LAYER, ResponseKVOutputsPass
from .shard_budgets import ShardBudgetsPass
from .slice_sequence import SliceSequencePass

__all__ = [
    "AttentionSite", "CachedAttentionPass", "CaptureVotesPass", "EvictKVPass", "FindAttentionPass", "GraphInfo",
    "GraphPass", "MaskOnlyHeadPass", "MaskPaddingPass", "PassManager", "PassResult", "PREFILL_OUTPUTS_PER_LAYER",
    "RESPONSE_KV_OUTPUTS_PER_LAYER", "ResponseKVOutputsPass", "ShardBudgetsPass",
    "STEP_INPUTS_PER_LAYER", "SliceSequencePass", "UnsupportedModelError", "analyse", "attention_sites",
]
