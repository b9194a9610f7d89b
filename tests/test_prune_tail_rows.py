"""PruneTailRowsPass: the prefill computes the layers after the last attention on the response
rows only (the rows whose logits it returns), and stays exact.

Which rows each projection computed is read from the projections themselves while the
optimized model's prefill runs (``torch._C._nn.linear``, which the rewritten graph calls by
name); the last layer's K/V projections still see every row (the cache needs them), its
output projection and MLP only the response rows, the layer before it every row.
"""

import pytest
import torch
from block_loops import block_causal_mask, tiny_qwen3

import maskkv_compile
from maskkv_compile.tiny_models import tiny_dream, tiny_llada

MASK = 255


def _rows_per_projection(monkeypatch, model, run) -> dict:
    """Weight name -> the number of rows each ``linear`` on it computed during ``run()``."""
    names = {p.data_ptr(): n for n, p in model.named_parameters()}
    seen: dict = {}
    real = torch._C._nn.linear

    def linear(x, weight, bias=None):
        seen.setdefault(names.get(weight.data_ptr()), []).append(x.shape[-2])
        return real(x, weight, bias)

    with monkeypatch.context() as patch:
        patch.setattr(torch._C._nn, "linear", linear)
        run()
    return seen


@pytest.mark.parametrize("family", ["llada", "dream", "block"])
def test_the_last_layer_after_its_attention_runs_on_the_response_rows_only(monkeypatch, family):
    build = {"llada": tiny_llada, "dream": tiny_dream, "block": tiny_qwen3}[family]
    model = build(dtype=torch.float64)
    optimized = maskkv_compile.optimize(model, budget=10**6, mask_token_id=MASK, backend="eager")

    def call(seed):
        x = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(seed))
        x[:, 20:] = MASK
        kwargs = {}
        if family == "block":  # blocks of 4 from 0: the window's last block is its response
            kwargs["attention_mask"] = block_causal_mask(24, 4, dtype=torch.float64)
        elif family == "llada":  # a padded batch: row 1 left-padded by 3
            kwargs["attention_mask"] = torch.ones_like(x)
            kwargs["attention_mask"][1, :3] = 0
        return x, kwargs

    x, kwargs = call(0)
    optimized(x, **kwargs)  # traces; the recorded call below is a new prompt's prefill
    record = next(
        r.result
        for r in optimized.runtime.graphs.records["prefill"]
        if r.result.name == "PruneTailRowsPass"
    )
    assert record.changed and record.skipped == ()
    x, kwargs = call(1)
    out = {}
    seen = _rows_per_projection(
        monkeypatch, model, lambda: out.setdefault("logits", optimized(x, **kwargs).logits)
    )
    assert optimized.cache_stats()["transitions"]["new"] == 2
    rows = optimized.runtime.last_session.layout.rows.numel()
    assert 0 < rows < 24
    last = model.config.num_hidden_layers - 1
    layer = f"model.layers.{last}"
    assert seen[f"{layer}.self_attn.k_proj.weight"] == [24]  # the cache needs every row's K/V
    assert seen[f"{layer}.self_attn.v_proj.weight"] == [24]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        expected = [24] if name == "self_attn.q_proj" else [rows]
        assert seen[f"{layer}.{name}.weight"] == expected, name
    assert seen[f"model.layers.{last - 1}.mlp.down_proj.weight"] == [24]
    # exact: the response rows' logits are the unoptimized model's
    reference = model(x, **kwargs).logits
    picked = optimized.runtime.last_session.layout.rows
    torch.testing.assert_close(out["logits"][:, picked], reference[:, picked])


def test_a_tail_that_mixes_rows_is_left_whole_and_says_why():
    """LLaDA2's last layer is a mixture of experts: its router picks experts over the flattened
    (B * S) tokens, which the pass cannot prove row-wise, so the prefill stays whole."""
    from maskkv_compile.llada2_standin import tiny_llada2

    model = tiny_llada2()
    optimized = maskkv_compile.optimize(model, budget=8, backend="eager")
    x = torch.randint(0, 200, (1, 12))
    x[:, 8:] = model.config.mask_token_id
    optimized(x)
    record = next(
        r.result
        for r in optimized.runtime.graphs.records["prefill"]
        if r.result.name == "PruneTailRowsPass"
    )
    assert not record.changed
    assert record.skipped and "does not hold the sequence in one dim" in record.skipped[0]
