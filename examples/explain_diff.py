"""explain(): what the MaskKV passes do to a model's graph (the model is not run).

    python examples/explain_diff.py [--graph prefill|step] [--html explain.html] \
        [--model-explorer graphs.json]

Prints the attention sites, every pass run with the maskkv:: ops it inserted, the kept-KV
plan, then the unified diff of the captured graph against the rewritten one. Set
MASKKV_DEBUG_DIR=dir to also get every graph before and after every pass as readable files.
"""

import argparse

import torch

import maskkv_compile
from maskkv_compile.tiny_models import tiny_dream

parser = argparse.ArgumentParser()
parser.add_argument("--graph", default="step", choices=["prefill", "step"])
parser.add_argument(
    "--html", help="also write the HTML report here (each site's before/after drawn)"
)
parser.add_argument("--model-explorer", help="also write the graphs as Model Explorer JSON here")
args = parser.parse_args()

# a Dream-style Qwen2 (grouped-query attention) spelled as HF's eager attention chain
model = tiny_dream(layers=2, hidden=64, attn="eager")
mask_id = model.config.mask_token_id
prompt = torch.randint(0, mask_id, (1, 32), generator=torch.Generator().manual_seed(0))
x = torch.cat([prompt, torch.full((1, 16), mask_id)], dim=1)  # step-0 input: prompt, then masks

report = maskkv_compile.explain(model, x, budget=8, family="dream")
print(report)
print()
print("inserted ops:", ", ".join(sorted({op for _, _, op in report.inserted})))
print(f"\n=== {args.graph} graph: captured -> rewritten ===")
print(report.diff(args.graph), end="")
if args.html:
    print("\nHTML report written to", report.to_html(args.html))
if args.model_explorer:  # view with: pip install ai-edge-model-explorer; model-explorer PATH
    print("Model Explorer graphs written to", report.to_model_explorer(args.model_explorer))
