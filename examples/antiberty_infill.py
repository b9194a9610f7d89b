"""MaskKV on a real pretrained masked LM: AntiBERTy (26M params, BERT, 8 layers x 8 heads).

Fills the masked CDR-H3 loop of an antibody heavy chain by iterative low-confidence
unmasking (one token per step), calling ``net(x).logits`` every step: the same loop runs
the uncached model and ``maskkv_compile.optimize(model, ...)`` for several policies and
budgets. Prints, per policy and budget, how many filled residues agree with the uncached
fill and how many recover the true residues.

Weights come from the ``antiberty`` wheel on PyPI (MIT licence), loaded offline with
``transformers.BertForMaskedLM``:

    pip install --no-deps antiberty==0.1.3
    python examples/antiberty_infill.py

Sequence: trastuzumab VH, public INN sequence. CDR-H3 (Kabat H95-H102) = WGGDGFYAMDY.
``--all-cases`` adds five more spans (trastuzumab CDR-H1/H2, the CDR-H3 of three other
antibodies) and a row for maskkv without a layer profile, and prints totals over all six;
one optimized model serves every case (a new prompt is a new session).
"""

import argparse
import importlib.util
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# trastuzumab VH, public INN sequence
TRASTUZUMAB_VH = (
    "EVQLVESGGGLVQPGGSLRLSCAASGFNIKDTYIHWVRQAPGKGLEWVARIYPTNGYTRYADSVKGRFTISADTSKNTAYLQMNSLRAEDTAVYYCSRWGGDGFYAMDYWGQGTLVTVSS"
)
CDR_H3 = "WGGDGFYAMDY"
# Other public heavy-chain variable domains (INN antibodies), used only to calibrate the layer
# profile; written from the published INN sequences, exact residues do not matter for calibration.
CALIBRATION_VH = [
    "EVQLVESGGGLVQPGRSLRLSCAASGFTFDDYAMHWVRQAPGKGLEWVSAITWNSGHIDYADSVEGRFTISRDNAKNSLYLQMNSLRAEDTAVYYCAKVSYLSTASSLDYWGQGTLVTVSS",  # adalimumab
    "EVQLVESGGGLVQPGGSLRLSCAASGFTFTDYTMDWVRQAPGKGLEWVADVNPNSGGSIYNQRFKGRFTLSVDRSKNTLYLQMNSLRAEDTAVYYCARNLGPSFYFDYWGQGTLVTVSS",  # pertuzumab
    "QVQLQQPGAELVKPGASVKMSCKASGYTFTSYNMHWVKQTPGRGLEWIGAIYPGNGDTSYNQKFKGKATLTADKSSSTAYMQLSSLTSEDSAVYYCARSTYYGGDWYFNVWGAGTTVTVSA",  # rituximab
]
# (name, heavy chain, masked span)
CASES = [
    ("trastuzumab CDR-H3", TRASTUZUMAB_VH, CDR_H3),
    ("trastuzumab CDR-H1", TRASTUZUMAB_VH, "GFNIKDTYIH"),
    ("trastuzumab CDR-H2", TRASTUZUMAB_VH, "RIYPTNGYTRYADSVKG"),
    ("adalimumab CDR-H3", CALIBRATION_VH[0], "VSYLSTASSLDY"),
    ("pertuzumab CDR-H3", CALIBRATION_VH[1], "NLGPSFYFDY"),
    ("rituximab CDR-H3", CALIBRATION_VH[2], "STYYGGDWYFNV"),
]
# "maskkv" uses a layer profile calibrated on CALIBRATION_VH; "maskkv-noprofile" (uniform layer
# budgets, the fallback without a profile) is only run with --all-cases, to stay under a minute.
POLICIES = ["maskkv", "mask_voting_uniform", "snapkv", "streaming", "random"]
BUDGETS = [4, 8, 16]
FULL = 512  # >= every prompt: the whole prompt is kept (all policies coincide)


def load():
    spec = importlib.util.find_spec("antiberty")
    if spec is None:
        print("antiberty is not installed (pip install --no-deps antiberty==0.1.3); nothing to do.")
        sys.exit(0)
    import transformers

    transformers.logging.set_verbosity_error()
    folder = os.path.join(os.path.dirname(spec.origin), "trained_models")
    model = transformers.BertForMaskedLM.from_pretrained(os.path.join(folder, "AntiBERTy_md_smooth")).eval()
    # transformers 5.x BertTokenizer(vocab_file=...) does not read this vocab: build it by hand.
    with open(os.path.join(folder, "vocab.txt")) as f:
        vocab = {line.strip(): i for i, line in enumerate(f)}
    return model, vocab


def encode(vocab, seq):
    return torch.tensor([[vocab["[CLS]"]] + [vocab[c] for c in seq] + [vocab["[SEP]"]]])


@torch.no_grad()
def fill(net, x, mask_id):
    """Unmask the most confident masked position, one per step, until none is left."""
    x = x.clone()
    while (x == mask_id).any():
        masked = x == mask_id
        logits = net(x).logits
        confidence, tokens = torch.softmax(logits.float(), -1).max(-1)
        confidence = torch.where(masked, confidence, float("-inf"))
        pick = confidence.argmax(-1)
        x[0, pick] = tokens[0, pick]
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-cases", action="store_true", help="six masked spans instead of one")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 26M model: one thread is as fast and robust on a shared CPU
    t0 = time.perf_counter()
    model, vocab = load()
    import maskkv_compile

    itos = {i: t for t, i in vocab.items()}
    mask_id = vocab["[MASK]"]
    cases = []
    for name, seq, span_text in CASES if args.all_cases else CASES[:1]:
        truth = encode(vocab, seq)
        start = 1 + seq.index(span_text)
        span = slice(start, start + len(span_text))
        x = truth.clone()
        x[0, span] = mask_id
        cases.append((name, x, truth, span))
    total = sum(c[3].stop - c[3].start for c in cases)

    def show(ids, span):
        return "".join(itos[int(i)] for i in ids[0, span])

    references = [fill(model, x, mask_id) for _, x, _, _ in cases]
    print("AntiBERTy (BertForMaskedLM, 8 layers x 8 heads); iterative unmasking, one residue per step")
    for (name, x, truth, span), ref in zip(cases, references):
        rec = int((ref[0, span] == truth[0, span]).sum())
        print(f"  {name:<20} prompt {x.shape[1] - (span.stop - span.start):>3}  true {show(truth, span):<18}"
              f" uncached {show(ref, span):<18} recovery {rec}/{span.stop - span.start}")
    uncached_recovery = sum(int((r[0, s] == t[0, s]).sum()) for r, (_, _, t, s) in zip(references, cases))

    profile = maskkv_compile.calibrate(model, [encode(vocab, s) for s in CALIBRATION_VH],
                                       gen_length=len(CDR_H3), mask_token_id=mask_id, progress=False)

    def run(policy, budget, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no layer profile: uniform layer budgets"
            net = maskkv_compile.optimize(model, budget=budget, mask_token_id=mask_id, backend="eager",
                                          policy=policy, **options)
            outs = [fill(net, x, mask_id) for _, x, _, _ in cases]
        agree = sum(int((o[0, s] == r[0, s]).sum()) for o, r, (_, _, _, s) in zip(outs, references, cases))
        rec = sum(int((o[0, s] == t[0, s]).sum()) for o, (_, _, t, s) in zip(outs, cases))
        return agree, rec, " ".join(show(o, s) for o, (_, _, _, s) in zip(outs, cases))

    print(f"\nagreement with the uncached fill / recovery of true residues (of {total}; "
          f"uncached recovery {uncached_recovery}/{total})")
    print(f"{'policy':<22}" + "".join(f"{'B=' + str(b):>14}" for b in BUDGETS))
    fills = {}
    for name in POLICIES + (["maskkv-noprofile"] if args.all_cases else []):
        policy, options = {"maskkv": ("maskkv", {"profile": profile}),
                           "maskkv-noprofile": ("maskkv", {})}.get(name, (name, {}))
        cells = [run(policy, budget, **options) for budget in BUDGETS]
        fills[name] = [c[2] for c in cells]
        print(f"{name:<22}" + "".join(f"{f'{a}/{total} {r}/{total}':>14}" for a, r, _ in cells))
    for label, options in (("full prompt", {}), ("full, refresh=1", {"prompt_refresh": 1})):
        a, r, f = run("maskkv", FULL, **options)
        fills[label] = [f]
        print(f"{label:<22}{f'{a}/{total} {r}/{total}':>14}   (any policy; B >= prompt)")
    if not args.all_cases:
        print("\nfills:")
        for name, row in fills.items():
            print(f"{name:<22}" + "  ".join(row))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
