"""The models and samples of the quality suite.

A :class:`Bundle` is one model with its mask id, the samples to infill and the calibration
prompts (disjoint from the samples) that MaskKV's layer profile is measured on:

* ``antiberty``: AntiBERTy (pretrained BERT, 8 layers, antibody sequences; ``pip install
  --no-deps antiberty==0.1.3``). Samples: public heavy chains (``data/antibody_heavy_chains.tsv``);
  task ``cdr3`` masks the Kabat CDR-H3 loop (infilling, prompt on both sides), task ``suffix``
  masks the last 20 residues.
* ``rxnfp``: the rxnfp BERT (pretrained masked LM, 12 layers, reaction SMILES; ``pip install
  --no-deps rxnfp==0.1.0``). Samples: patent reactions (``data/uspto_reactions.tsv``); task
  ``product_span`` masks 12 tokens in the middle of the product, ``suffix`` the last 20 tokens.
  rxnfp's own tokenizer imports rdkit, so the SMILES are split here by a regex with the
  package's vocabulary file.
* ``tiny-dllm``: the project's own LLaDA-style diffusion LM (3-layer bidirectional Llama, 0.8M
  parameters) trained by ``scripts/train_tiny_dllm.py`` on RULER-style needle retrieval
  (:mod:`maskkv_compile.evaluation.needles`), shipped in ``data/tiny_dllm``; ``checkpoint=``
  loads another folder the script wrote. Task ``single`` has one needle in a 256-token
  haystack, ``multikey`` four (one asked for, three distractors). The answer is the needle's
  2-token value; the score is exact match of the whole value.
* ``ruler`` / ``ruler-block``: the project's long-context diffusion LMs (4-layer Llama, 1.1M
  parameters), trained by ``scripts/train_ruler.py`` on the RULER-style suite
  (:mod:`maskkv_compile.evaluation.ruler`): ``ruler`` with full bidirectional attention
  (LLaDA-style), ``ruler-block`` block-causal with blocks of 32 (LLaDA2 / SDAR-style; the suite
  runs its block loop, the window growing by one block). Shipped in ``data/ruler_full`` and
  ``data/ruler_block`` when they pass their bar (docs/ruler_models.md); ``checkpoint=`` loads a
  folder the script wrote. Seven tasks at 2048 tokens; the score is exact match of the answer.
* ``tiny-llama``: :func:`maskkv_compile.tiny_models.tiny_llada` with random weights and random
  sequences: fast, for CI only; its quality numbers mean nothing.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from maskkv_compile.evaluation.ruler import TASKS as RULER_TASKS

MODELS = ("antiberty", "rxnfp", "tiny-dllm", "ruler", "ruler-block", "tiny-llama")
TASKS = {
    "antiberty": ("cdr3", "suffix"),
    "rxnfp": ("product_span", "suffix"),
    "tiny-dllm": ("single", "multikey"),
    "ruler": RULER_TASKS,
    "ruler-block": RULER_TASKS,
    "tiny-llama": ("span", "suffix"),
}


class ModelUnavailable(RuntimeError):
    """The package that ships the model's weights is not installed."""


@dataclass(frozen=True)
class Sample:
    """One sequence with one masked span ``[start, stop)``; the rest of it is the prompt."""

    id: str
    task: str
    ids: tuple[int, ...]  # the true tokens, special tokens included
    start: int
    stop: int

    @property
    def span_len(self) -> int:
        return self.stop - self.start

    @property
    def prompt_len(self) -> int:
        return len(self.ids) - self.span_len

    def masked(self, mask_id: int) -> torch.Tensor:
        x = torch.tensor([self.ids], dtype=torch.long)
        x[0, self.start : self.stop] = mask_id
        return x

    def truth(self) -> list[int]:
        return list(self.ids[self.start : self.stop])

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "ids": list(self.ids),
            "start": self.start,
            "stop": self.stop,
            "prompt_len": self.prompt_len,
        }


@dataclass
class Bundle:
    name: str
    model: torch.nn.Module
    mask_id: int
    samples: list[Sample]
    calibration: list[torch.Tensor]  # (1, P) prompts without masks
    calibration_gen_length: int
    decode: Callable[[Sequence[int]], str]
    note: str = ""
    tasks: tuple[str, ...] = field(default_factory=tuple)
    exact: bool = (
        False  # score a sample 1 only if the whole span is right (retrieval), else per token
    )
    block_length: Optional[int] = None  # a block-diffusion model: the suite runs its block loop

    def calibrate(self):
        """The layer profile on the calibration prompts, measured as the bundle's loop calls
        the model: with ``calibration_gen_length`` masks, or for a block-diffusion model its
        first block window, block-causally."""
        import maskkv_compile

        block = self.block_length is not None
        return maskkv_compile.calibrate(
            self.model,
            self.calibration,
            gen_length=None if block else self.calibration_gen_length,
            block_length=self.block_length,
            mask_token_id=self.mask_id,
            progress=False,
        )


def read_table(name: str) -> list[dict]:
    """Rows of a tab-separated file of ``maskkv_compile/data`` ('#' lines are comments)."""
    text = (importlib.resources.files("maskkv_compile") / "data" / name).read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def _select(rows: list[dict], n: Optional[int]) -> tuple[list[dict], list[dict]]:
    evaluated = [r for r in rows if r["split"] == "eval"]
    calibration = [r for r in rows if r["split"] == "calibration"]
    if n is not None:
        if n < 1:
            raise ValueError(f"samples must be >= 1, got {n}")
        evaluated = evaluated[:n]
    return evaluated, calibration


def _check_tasks(model: str, tasks: Optional[Sequence[str]]) -> tuple[str, ...]:
    tasks = tuple(tasks) if tasks else TASKS[model]
    unknown = [t for t in tasks if t not in TASKS[model]]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for {model}; valid: {list(TASKS[model])}")
    return tasks


def _package_dir(name: str, pip: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"{name} is not installed: pip install --no-deps {pip}")
    return os.path.dirname(spec.origin)


def _read_vocab(path: str) -> dict[str, int]:
    with open(path) as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def _bert(folder: str) -> torch.nn.Module:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # unused pooler / extra heads: "unexpected keys"
    try:
        return transformers.BertForMaskedLM.from_pretrained(folder).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


# ------------------------------------------------------------------ AntiBERTy


def kabat_cdr_h3(vh: str) -> tuple[int, int]:
    """``[start, stop)`` of the Kabat CDR-H3 (H95-H102) in a heavy-chain variable domain: it
    starts 3 residues after the Cys at H92 and ends before the Trp of the ``WGxG`` motif (H103)."""
    motifs = [m.start() for m in re.finditer(r"(?=WG.G)", vh)]
    if not motifs:
        raise ValueError(f"no WGxG motif (H103-H106) in {vh}")
    stop = motifs[-1]
    cys = vh.rfind("C", 0, stop - 3)
    if cys < 80:
        raise ValueError(f"no Cys H92 before the WGxG motif in {vh}")
    return cys + 3, stop


def load_antiberty(
    samples: Optional[int] = None, tasks: Optional[Sequence[str]] = None, suffix_len: int = 20
) -> Bundle:
    folder = os.path.join(_package_dir("antiberty", "antiberty==0.1.3"), "trained_models")
    tasks = _check_tasks("antiberty", tasks)
    model = _bert(os.path.join(folder, "AntiBERTy_md_smooth"))
    # transformers 5.x BertTokenizer(vocab_file=...) does not read this vocabulary:
    # one token per residue.
    vocab = _read_vocab(os.path.join(folder, "vocab.txt"))
    itos = {i: t for t, i in vocab.items()}

    def encode(seq: str) -> list[int]:
        return [vocab["[CLS]"]] + [vocab[c] for c in seq] + [vocab["[SEP]"]]

    evaluated, calibration = _select(read_table("antibody_heavy_chains.tsv"), samples)
    out = []
    for task in tasks:
        for row in evaluated:
            vh = row["vh"]
            start, stop = kabat_cdr_h3(vh) if task == "cdr3" else (len(vh) - suffix_len, len(vh))
            out.append(
                Sample(f"{row['name']}/{task}", task, tuple(encode(vh)), start + 1, stop + 1)
            )  # +1: [CLS]
    return Bundle(
        "antiberty",
        model,
        vocab["[MASK]"],
        out,
        [torch.tensor([encode(r["vh"])]) for r in calibration],
        calibration_gen_length=12,
        decode=lambda ids: "".join(itos[int(i)] for i in ids),
        tasks=tasks,
        note="AntiBERTy (BertForMaskedLM, 8 layers x 8 heads, hidden 512), pretrained "
        "on antibody sequences",
    )


# ------------------------------------------------------------------ rxnfp

# One token per bracket atom, two-letter halogen, atom, ring-closure label, bond or branch
# symbol; ">>" separates precursors from products.
SMILES_TOKEN = re.compile(r"\[[^\[\]]+\]|Br|Cl|>>|%\d\d|[BCNOSPFIbcnosp]|\d|[=#\-+\\/().:~@?*$>]")


def smiles_tokens(smiles: str) -> list[str]:
    tokens = SMILES_TOKEN.findall(smiles)
    if "".join(tokens) != smiles:
        raise ValueError(f"cannot split {smiles!r} into SMILES tokens")
    return tokens


def load_rxnfp(
    samples: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    span_len: int = 12,
    suffix_len: int = 20,
) -> Bundle:
    folder = os.path.join(
        _package_dir("rxnfp", "rxnfp==0.1.0"), "models", "transformers", "bert_pretrained"
    )
    tasks = _check_tasks("rxnfp", tasks)
    model = _bert(folder)
    vocab = _read_vocab(os.path.join(folder, "vocab.txt"))
    itos = {i: t for t, i in vocab.items()}

    def encode(rxn: str) -> list[int]:
        tokens = smiles_tokens(rxn)
        missing = sorted({t for t in tokens if t not in vocab})
        if missing:
            raise ValueError(f"tokens {missing} of {rxn!r} are not in the rxnfp vocabulary")
        return [vocab["[CLS]"]] + [vocab[t] for t in tokens] + [vocab["[SEP]"]]

    evaluated, calibration = _select(read_table("uspto_reactions.tsv"), samples)
    out = []
    arrow = vocab[">>"]
    for task in tasks:
        for row in evaluated:
            ids = encode(row["rxn"])
            product = ids.index(arrow) + 1, len(ids) - 1  # product tokens, [SEP] excluded
            if task == "suffix":
                start, stop = product[1] - suffix_len, product[1]
            else:
                start = product[0] + max(0, (product[1] - product[0] - span_len) // 2)
                stop = min(start + span_len, product[1])
            out.append(Sample(f"{row['id']}/{task}", task, tuple(ids), start, stop))
    return Bundle(
        "rxnfp",
        model,
        vocab["[MASK]"],
        out,
        [torch.tensor([encode(r["rxn"])]) for r in calibration],
        calibration_gen_length=12,
        decode=lambda ids: "".join(itos[int(i)] for i in ids),
        tasks=tasks,
        note="rxnfp bert_pretrained (BertForMaskedLM, 12 layers x 4 heads, hidden 256), "
        "pretrained on reaction SMILES",
    )


# ------------------------------------------------------------------ tiny-dllm

TINY_DLLM_HAYSTACK = 256
TINY_DLLM_NEEDLES = {"single": 1, "multikey": 4}


def tiny_dllm_folder(checkpoint: Optional[str] = None) -> str:
    """The retrieval dLLM to load: ``checkpoint`` (a ``save_pretrained`` folder written by
    ``scripts/train_tiny_dllm.py``) or the one shipped in ``data/tiny_dllm``."""
    if checkpoint is None:
        return str(importlib.resources.files("maskkv_compile") / "data" / "tiny_dllm")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ModelUnavailable(
            f"{checkpoint} is not a save_pretrained folder (no config.json in it)"
        )
    return checkpoint


def load_tiny_dllm_model(checkpoint: Optional[str] = None) -> torch.nn.Module:
    """The needle-retrieval dLLM (a bidirectional Llama), in eval mode."""
    import transformers

    from maskkv_compile.tiny_models import _bidirectional

    return _bidirectional(
        transformers.LlamaForCausalLM.from_pretrained(tiny_dllm_folder(checkpoint))
    )


def needle_name(token: int) -> str:
    """``k3`` (key), ``v7`` (value), ``.`` (filler), ``<bos>`` ... for one needle-task token."""
    from maskkv_compile.evaluation import needles as nt

    if token in nt.KEYS:
        return f"k{token - nt.KEYS[0]}"
    if token in nt.VALUES:
        return f"v{token - nt.VALUES[0]}"
    if token in nt.FILLER:
        return "."
    return {nt.BOS: "<bos>", nt.SEP: "<sep>", nt.QUERY: "<q>", nt.MASK: "<mask>"}.get(
        token, f"<{token}>"
    )


def needle_sample(sid: str, task: str, seq) -> Sample:
    """The suite sample of a :class:`~maskkv_compile.evaluation.needles.Needles` sequence: its
    last answer (needle 0's value) masked."""
    start, stop = seq.answers[-1]
    return Sample(sid, task, tuple(seq.ids), start, stop)


def load_tiny_dllm(
    samples: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    seed: int = 0,
    haystack: int = TINY_DLLM_HAYSTACK,
    checkpoint: Optional[str] = None,
) -> Bundle:
    from maskkv_compile.evaluation import needles as nt

    tasks = _check_tasks("tiny-dllm", tasks)
    model = load_tiny_dllm_model(checkpoint)
    n = 16 if samples is None else samples
    if n < 1:
        raise ValueError(f"samples must be >= 1, got {n}")
    out = []
    for task in tasks:
        # evaluation and calibration streams: fixed seeds, disjoint from training's (seed 0..)
        gen = torch.Generator().manual_seed(7_000_000 + 1000 * seed + TINY_DLLM_NEEDLES[task])
        out += [
            needle_sample(
                f"needle{i}/{task}", task, nt.needle_task(gen, haystack, TINY_DLLM_NEEDLES[task])
            )
            for i in range(n)
        ]
    gen = torch.Generator().manual_seed(8_000_000 + seed)
    calibration = []
    for needles in (1, 2, 4, 4):
        seq = nt.needle_task(gen, haystack, needles)
        calibration.append(torch.tensor([seq.ids[: seq.answers[-1][0]]]))
    return Bundle(
        "tiny-dllm",
        model,
        nt.MASK,
        out,
        calibration,
        calibration_gen_length=nt.VALUE_LEN,
        decode=lambda ids: " ".join(needle_name(int(i)) for i in ids),
        tasks=tasks,
        exact=True,
        note="tiny-dllm: LLaDA-style diffusion LM trained by scripts/train_tiny_dllm.py on "
        f"RULER-style needle retrieval ({checkpoint or 'data/tiny_dllm'}, "
        f"{model.config.num_hidden_layers} layers); haystack {haystack} tokens, score = exact "
        f"match of the {nt.VALUE_LEN}-token value",
    )


# ------------------------------------------------------------------ ruler

RULER_LENGTH = 2048
RULER_FOLDERS = {"ruler": "ruler_full", "ruler-block": "ruler_block"}


def ruler_folder(name: str, checkpoint: Optional[str] = None) -> str:
    """The long-context dLLM to load: ``checkpoint`` (a folder ``scripts/train_ruler.py``
    wrote) or the shipped one."""
    if checkpoint is None:
        folder = importlib.resources.files("maskkv_compile") / "data" / RULER_FOLDERS[name]
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(
                f"{name}: no shipped checkpoint (data/{RULER_FOLDERS[name]}); train one with "
                "scripts/train_ruler.py (docs/ruler_models.md) and pass --checkpoint DIR"
            )
        return str(folder)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ModelUnavailable(
            f"{checkpoint} is not a save_pretrained folder (no config.json in it)"
        )
    return checkpoint


def load_ruler_model(name: str, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """A long-context dLLM in eval mode; its config's ``ruler`` entry says full or block
    attention (and the block length)."""
    import transformers

    from maskkv_compile.tiny_models import _bidirectional

    model = _bidirectional(
        transformers.LlamaForCausalLM.from_pretrained(ruler_folder(name, checkpoint))
    )
    trained = getattr(model.config, "ruler", {}) or {}
    want = "block" if name == "ruler-block" else "full"
    if trained.get("attention") != want:
        raise ValueError(
            f"{name} wants a model trained with {want} attention; this checkpoint's config says "
            f"ruler={trained!r} (use --model {'ruler-block' if want == 'full' else 'ruler'})"
        )
    return model


def ruler_sample(sid: str, seq) -> Sample:
    return Sample(sid, seq.task, seq.ids, seq.start, len(seq.ids))


def load_ruler(
    name: str,
    samples: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    seed: int = 0,
    length: int = RULER_LENGTH,
    checkpoint: Optional[str] = None,
) -> Bundle:
    from maskkv_compile.evaluation import ruler

    tasks = _check_tasks(name, tasks)
    model = load_ruler_model(name, checkpoint)
    n = 16 if samples is None else samples
    if n < 1:
        raise ValueError(f"samples must be >= 1, got {n}")
    out = []
    for task in tasks:
        # fixed seeds, disjoint from training's (0..) and the training script's held-out (10**6..)
        gen = torch.Generator().manual_seed(
            7_000_000 + 1000 * seed + 10 * ruler.TASKS.index(task) + 1
        )
        out += [ruler_sample(f"{i}/{task}", ruler.ruler_task(gen, task, length)) for i in range(n)]
    gen = torch.Generator().manual_seed(8_000_000 + seed)
    calibration = [
        torch.tensor([s.ids[: s.start]])
        for s in (ruler.ruler_task(gen, task, length) for task in ruler.TASKS)
    ]
    block = model.config.ruler.get("block")
    return Bundle(
        name,
        model,
        ruler.MASK,
        out,
        calibration,
        calibration_gen_length=ruler.VALUE_LEN,
        decode=lambda ids: " ".join(ruler.token_name(int(i)) for i in ids),
        tasks=tasks,
        exact=True,
        block_length=block,
        note=f"{name}: long-context diffusion LM trained by scripts/train_ruler.py "
        f"({checkpoint or 'data/' + RULER_FOLDERS[name]}, {model.config.num_hidden_layers} "
        f"layers, {'block-causal, blocks of %d' % block if block else 'full attention'}); "
        f"RULER-style tasks at {length} tokens, score = exact match of the answer",
    )


# ------------------------------------------------------------------ tiny-llama


def load_tiny_llama(
    samples: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    seed: int = 0,
    seq_len: int = 40,
    span_len: int = 6,
    layers: int = 2,
    hidden: int = 64,
) -> Bundle:
    from maskkv_compile.tiny_models import tiny_llada

    tasks = _check_tasks("tiny-llama", tasks)
    model = tiny_llada(layers=layers, hidden=hidden, seed=seed)
    mask_id = model.config.mask_token_id
    n = 4 if samples is None else samples
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, mask_id, (n + 2, seq_len), generator=gen)
    out = []
    for task in tasks:
        for i in range(n):
            start = (seq_len - span_len) // 2 if task == "span" else seq_len - span_len
            out.append(
                Sample(
                    f"random{i}/{task}", task, tuple(sequences[i].tolist()), start, start + span_len
                )
            )
    return Bundle(
        "tiny-llama",
        model,
        mask_id,
        out,
        [sequences[n : n + 1], sequences[n + 1 :]],
        calibration_gen_length=span_len,
        decode=lambda ids: " ".join(str(int(i)) for i in ids),
        tasks=tasks,
        note=f"tiny LLaDA-style Llama ({layers} layers, hidden {hidden}), RANDOM weights and "
        "random tokens: exercises the suite only, its quality numbers mean nothing",
    )


def load_bundle(
    name: str,
    samples: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    seed: int = 0,
    checkpoint: Optional[str] = None,
    context: Optional[int] = None,
) -> Bundle:
    """The named model with ``samples`` sequences per task (default: all eval rows; tiny-dllm 16,
    tiny-llama 4); ``checkpoint`` is a folder of the project's own models to load instead of
    the shipped one; ``context`` the RULER tasks' length in tokens (default ``RULER_LENGTH``)."""
    if checkpoint is not None and name not in ("tiny-dllm", *RULER_FOLDERS):
        raise ValueError(f"checkpoint= is for the project's own models only, not {name!r}")
    if context is not None and name not in RULER_FOLDERS:
        raise ValueError(f"context= is for the RULER-style models only, not {name!r}")
    if name == "antiberty":
        return load_antiberty(samples, tasks)
    if name == "rxnfp":
        return load_rxnfp(samples, tasks)
    if name == "tiny-dllm":
        return load_tiny_dllm(samples, tasks, seed=seed, checkpoint=checkpoint)
    if name in RULER_FOLDERS:
        return load_ruler(
            name, samples, tasks, seed=seed, length=context or RULER_LENGTH, checkpoint=checkpoint
        )
    if name == "tiny-llama":
        return load_tiny_llama(samples, tasks, seed=seed)
    raise ValueError(f"unknown model {name!r}; valid: {list(MODELS)}")
