"""The runtime's invariants, over seeded random sequences of calls on ONE optimized model each.

* I1: every position that holds the mask token in a call gets the model's logits (Dream: the
  row before it), never zeros, in every transition. Exempt by contract: the masked prompt of
  a CFG copy row (its logits are the conditional row's prompt's, which no loop commits) and,
  at a dual-cache block step, the response rows outside the loop's current block.
* I2: at a budget of at least the prompt with ``prompt_refresh=1``, every call equals the
  uncached model (float64) at those positions, whatever ran before on the same optimized
  model: other prompts, CFG in one batch and in two calls, ``reset()``, ``generate``, drop-in
  loops mixed, batch-size changes, padded batches, weights changed in place.
* I3: a cached path never stops silently: a call that continues a loop but runs a prefill
  anyway, or runs uncached, is counted in ``cache_stats()["fallbacks"]``, and each reason is
  warned at most once per runtime.

Each parametrized case drives 50 random sequences (LLaDA and Dream shapes; plain, dual cache,
re-vote with a recent window; full budget and eviction): 350 at full budget and eviction
together.
"""

import random
import warnings
from collections import Counter

import pytest
import torch

import maskkv_compile
from maskkv_compile import CacheFallbackWarning
from maskkv_compile.tiny_models import tiny_dream, tiny_llada

SEQUENCES = 50
PREFILLS = ("new", "restart", "uncached")


class Harness:
    def __init__(self, family: str, exact: bool, rng: random.Random, **options):
        build = tiny_llada if family == "llada" else tiny_dream
        self.model = build(layers=2, hidden=32, heads=2, dtype=torch.float64)
        self.shift = 1 if family == "dream" else 0
        self.mask = self.model.config.mask_token_id
        self.exact, self.rng = exact, rng
        budget = 64 if exact else 2
        refresh = {"prompt_refresh": 1} if exact else {}
        family_option = (
            {"family": "dream"} if family == "dream" else {}
        )  # the Qwen2 stand-in is not named Dream
        self.opt = maskkv_compile.optimize(
            self.model, budget=budget, backend="eager", **refresh, **family_option, **options
        )
        self.block = options.get("block_length")
        self.ran = (
            Counter()
        )  # the transitions of the checked calls (cache_stats' counts restart at reset())

    # -- checks ----------------------------------------------------------------------------
    def positions(self, x: torch.Tensor, block=None) -> torch.Tensor:
        """(B, S) bool: where I1 and I2 are checked (the rows that hold a masked token's logits)."""
        masked = x == self.mask
        if block is not None:
            inside = torch.zeros_like(masked)
            inside[:, block] = True
            masked &= inside
        session = self.opt.runtime.last_session
        if session is not None:  # the masked prompt of a CFG copy row is exempt
            for row, twin in enumerate(session.layout.twins):
                copied = twin is not None or bool((masked[row] & session.layout.prompt[row]).any())
                if copied:
                    masked[row] &= ~session.layout.prompt[row]
        if self.shift:
            masked = torch.cat([masked[:, 1:], torch.zeros_like(masked[:, :1])], 1) | (
                masked & (torch.arange(masked.shape[1]) == 0)
            )
        return masked

    def call(self, x, attention_mask=None, block=None, continuing=False):
        """Run one call and check I1-I3; returns (logits, whether it ran uncached). ``continuing``:
        the call continues this stream's last call, which ran cached."""
        before = self.opt.cache_stats() if self.opt._last_runtime is not None else None
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.opt(x, **kwargs).logits
        where = self.positions(x, block)
        if attention_mask is not None:
            where &= attention_mask.bool()
        rows = out[where]
        assert bool((rows != 0).any(-1).all()), "I1: a masked position got zero logits"
        if self.exact:
            with torch.no_grad():
                reference = self.model(x, **kwargs).logits
            torch.testing.assert_close(rows, reference[where], atol=1e-8, rtol=1e-8, msg="I2")
        stats = self.opt.cache_stats()
        ran = Counter(stats["transitions"]) - Counter(before["transitions"] if before else {})
        self.ran += ran
        if continuing and set(ran) & set(PREFILLS) and not (self.exact and "refresh" in ran):
            grew = Counter(stats["fallbacks"]) - Counter(before["fallbacks"] if before else {})
            assert grew, f"I3: a continuing call ran {dict(ran)} with no fallback counted"
        return out, "uncached" in ran

    # -- what a user does -------------------------------------------------------------------
    def prompt(self, batch, length):
        return torch.randint(
            0,
            self.mask - 4,
            (batch, length),
            generator=torch.Generator().manual_seed(self.rng.randrange(10**6)),
        )

    def drop_in(self, batch, cfg=None):
        """A drop-in loop of a few calls; committing one token per row per call, block by block."""
        p, gen = self.rng.choice([6, 9]), 2 * (self.block or 4)
        x = torch.cat([self.prompt(batch, p), torch.full((batch, gen), self.mask)], 1)
        padded = None
        if batch > 1 and self.rng.random() < 0.3:
            padded = torch.ones_like(x)
            padded[0, :2] = 0  # left padding of row 0
            x[0, :2] = 0
        calls = self.rng.randint(1, gen)
        cached = [
            False,
            False,
        ]  # per stream (conditional, unconditional): its last call ran uncached
        for i in range(calls):
            resp = torch.arange(p, p + gen)
            open_ = resp[(x[0, resp] == self.mask)]
            if open_.numel() == 0:
                break
            block = None
            if self.block is not None:
                first = int(open_[0]) - p
                block = torch.arange(
                    p + first // self.block * self.block, p + (first // self.block + 1) * self.block
                )
            if cfg == "two_calls":
                un = x.clone()
                un[:, :p] = self.mask
                _, cached[0] = self.call(x, padded, block, continuing=i > 0 and not cached[0])
                _, cached[1] = self.call(un, padded, block, continuing=i > 0 and not cached[1])
                logits = None
            else:
                both = x
                mask = padded
                if cfg == "batched":
                    un = x.clone()
                    un[:, :p] = self.mask
                    both = torch.cat([x, un])
                    mask = None if padded is None else torch.cat([padded, padded])
                logits, cached[0] = self.call(both, mask, block, continuing=i > 0 and not cached[0])
                logits = logits[:batch]
            for row in range(batch):
                masked = resp[x[row, resp] == self.mask]
                if block is not None:
                    masked = masked[(masked >= block[0]) & (masked <= block[-1])]
                if masked.numel():
                    pos = (
                        masked[self.rng.randrange(masked.numel())]
                        if logits is None
                        else masked[logits[row, masked - self.shift].amax(-1).argmax()]
                    )
                    x[row, pos] = self.rng.randrange(self.mask - 4)

    def step(self):
        op = self.rng.choice(
            [
                "loop",
                "loop",
                "loop",
                "cfg_batched",
                "cfg_two",
                "reset",
                "generate",
                "weights",
                "batch",
            ]
        )
        if op == "loop":
            self.drop_in(self.rng.choice([1, 1, 2]))
        elif op == "cfg_batched" and not self.shift:
            self.drop_in(1, cfg="batched")
        elif op == "cfg_two" and not self.shift:
            self.drop_in(1, cfg="two_calls")
        elif op == "reset":
            self.opt.reset()
        elif op == "generate" and not self.shift:
            prompt = self.prompt(1, 6)
            gen = 2 * (self.block or 4)
            out = self.opt.generate(
                prompt, gen_length=gen, steps=gen, block_length=self.block or gen
            )
            assert bool((out != self.mask).all())
            if self.exact:
                from maskkv_compile.generate import generate

                assert torch.equal(
                    out,
                    generate(
                        self.model,
                        prompt,
                        mask_token_id=self.mask,
                        gen_length=gen,
                        steps=gen,
                        block_length=self.block or gen,
                    ),
                ), "I2: generate"
        elif op == "weights":
            with torch.no_grad():
                self.model.lm_head.weight.mul_(1.0 + 0.01 * self.rng.random())
        elif op == "batch":
            self.drop_in(3)


CASES = [
    ("llada", True, {}),
    ("dream", True, {}),
    ("llada", True, {"block_length": 4}),
    ("llada", False, {}),
    ("dream", False, {}),
    ("llada", False, {"block_length": 4}),
    ("llada", False, {"revote": 2, "recent": 1}),
]


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "family, exact, options",
    CASES,
    ids=[f"{f}-{'exact' if e else 'evict'}-{'-'.join(o) or 'plain'}" for f, e, o in CASES],
)
def test_invariants_over_random_call_sequences(family, exact, options):
    rng = random.Random(f"{family}{exact}{sorted(options)}")
    harness = Harness(family, exact, rng, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheFallbackWarning)
        for _ in range(SEQUENCES):
            for _ in range(rng.randint(1, 4)):
                harness.step()
    reasons = Counter(
        str(w.message) for w in caught if issubclass(w.category, CacheFallbackWarning)
    )
    runtimes = len(harness.opt.runtimes)
    assert all(n <= runtimes for n in reasons.values()), (
        f"I3: warned more than once per runtime: {reasons}"
    )
    ran = harness.ran
    assert sum(ran.values()) > 2 * SEQUENCES, ran
    if not exact:  # the cached path ran: more steps than prefills
        assert (
            ran["step"] + ran["block_step"] + ran["block_refresh"] > ran["new"] + ran["uncached"]
        ), ran
    if options.get("block_length"):
        assert ran["block_step"] > 0 or exact, ran
