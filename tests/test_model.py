"""The model against the paper's formulas and PyTorch's reference modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import small_transformer
from transformer_mt.model import Dropout, MultiHeadAttention, PositionalEncoding
from transformer_mt.model.attention import (
    WRITTEN_OUT_MAX_KEYS,
    ScaledDotProductAttention,
    attend,
)
from transformer_mt.model.cache import MIN_KEYS, padded_keys
from transformer_mt.model.dropout import keep_mask, positive
from transformer_mt.model.packed import PackedLinear


def copy_into_reference(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)


@pytest.mark.parametrize("masking", ["none", "key_padding", "causal"])
def test_multi_head_attention_matches_torch(masking: str) -> None:
    torch.manual_seed(0)
    d, h, b, tq, tk = 32, 4, 3, 5, 7
    ours = MultiHeadAttention(d, h, dropout=0.0).eval()
    ref = nn.MultiheadAttention(d, h, batch_first=True).eval()
    copy_into_reference(ours, ref)
    q = torch.randn(b, tq, d)
    kv = torch.randn(b, tk, d) if masking != "causal" else q
    if masking == "none":
        expected, _ = ref(q, kv, kv, need_weights=False)
        actual = ours(q, kv)
    elif masking == "key_padding":
        lengths = torch.tensor([7, 4, 1])
        pad = torch.arange(tk)[None, :] >= lengths[:, None]  # True = padding (torch's convention)
        expected, _ = ref(q, kv, kv, key_padding_mask=pad, need_weights=False)
        actual = ours(q, kv, mask=~pad[:, None, None, :])
    else:
        causal = nn.Transformer.generate_square_subsequent_mask(tq)
        expected, _ = ref(q, kv, kv, attn_mask=causal, need_weights=False)
        actual = ours(q, kv, causal=True)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Gradients too: Q, K and V (self-attention) or K and V (cross) are one stacked product.
    upstream = torch.randn_like(expected)
    actual.backward(upstream)
    expected.backward(upstream)
    ours_in = torch.cat([ours.q_proj.weight.grad, ours.k_proj.weight.grad, ours.v_proj.weight.grad])
    torch.testing.assert_close(ours_in, ref.in_proj_weight.grad, atol=1e-5, rtol=1e-5)
    ours_bias = torch.cat([ours.q_proj.bias.grad, ours.k_proj.bias.grad, ours.v_proj.bias.grad])
    torch.testing.assert_close(ours_bias, ref.in_proj_bias.grad, atol=1e-5, rtol=1e-5)


def test_attention_without_bias_stacks_the_projections_of_one_input() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, dropout=0.0, bias=False).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)

    def separate(query: torch.Tensor, kv: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = (
            mha._split_heads(x @ proj.weight.t())
            for x, proj in ((query, mha.q_proj), (kv, mha.k_proj), (kv, mha.v_proj))
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return mha.out_proj(out.transpose(1, 2).reshape(query.shape))

    torch.testing.assert_close(mha(x, x, causal=True), separate(x, x, True))
    torch.testing.assert_close(mha(x, memory), separate(x, memory, False))


def _attention_inputs(
    masking: str,
) -> tuple[list[torch.Tensor], torch.Tensor | None, bool]:
    torch.manual_seed(0)
    b, h, tq, tk, dk = 3, 4, 5, 7 if masking != "causal" else 5, 8
    qkv = [torch.randn(b, h, t, dk, requires_grad=True) for t in (tq, tk, tk)]
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(tk)[None, :] < lengths[:, None])[:, None, None, :]
    return qkv, mask if masking == "key_padding" else None, masking == "causal"


@pytest.mark.parametrize("masking", ["none", "key_padding", "causal"])
def test_attention_with_dropout_is_the_fused_kernel_when_nothing_is_dropped(
    masking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In training with dropout the CPU path is written out; with a mask that keeps every
    weight it must equal PyTorch's kernel without dropout, in value and gradient."""
    qkv, mask, causal = _attention_inputs(masking)
    expected = F.scaled_dot_product_attention(*qkv, attn_mask=mask, is_causal=causal)
    expected_grads = torch.autograd.grad(expected.square().sum(), qkv)
    monkeypatch.setattr(
        "transformer_mt.model.dropout.keep_mask",
        lambda shape, p, dtype, where=None: torch.ones(shape, dtype=dtype),
    )
    actual = ScaledDotProductAttention(dropout=0.4).train()(*qkv, mask=mask, causal=causal)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(actual.square().sum(), qkv)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masking", ["none", "key_padding", "causal"])
def test_inference_attention_on_cpu_is_written_out_for_short_keys_only(
    masking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without gradients, in fp32 over few keys, the written-out form (faster there) gives the
    fused kernel's values; in bf16, or over more than WRITTEN_OUT_MAX_KEYS keys, it is the
    fused kernel."""
    qkv, mask, causal = _attention_inputs(masking)
    q, k, v = (t.detach() for t in qkv)
    attn = ScaledDotProductAttention(dropout=0.3).eval()
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("fused"))
        written = attn(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(written, fused, atol=1e-6, rtol=1e-5)
    half = [t.bfloat16() for t in (q, k, v)]  # bf16 keeps the kernel's fp32 scores
    with torch.inference_mode():
        assert torch.equal(
            attn(*half, mask=mask, causal=causal),
            F.scaled_dot_product_attention(*half, attn_mask=mask, is_causal=causal),
        )
    n = WRITTEN_OUT_MAX_KEYS + 1
    long_k, long_v = (torch.randn(3, 4, n, 8) for _ in range(2))
    long_q = long_k if causal else q
    long_mask = None if mask is None else torch.ones(3, 1, 1, n, dtype=torch.bool)
    with torch.no_grad():
        long = attn(long_q, long_k, long_v, mask=long_mask, causal=causal)
    fused = F.scaled_dot_product_attention(
        long_q, long_k, long_v, attn_mask=long_mask, is_causal=causal
    )
    assert torch.equal(long, fused)


def test_attention_dropout_drops_weights_without_bias_and_follows_torch_seed() -> None:
    qkv, mask, _ = _attention_inputs("key_padding")
    q, k, v = (t.detach() for t in qkv)
    attn = ScaledDotProductAttention(dropout=0.5).train()
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.manual_seed(1)
    first = attn(q, k, v, mask=mask)
    torch.manual_seed(1)
    assert torch.equal(attn(q, k, v, mask=mask), first)  # the mask follows torch's generator
    assert not torch.allclose(first, exact, atol=1e-3)  # weights were dropped
    # The third sentence has one real key: its weight 1 is kept (output 2·v) or dropped (0).
    only_key = v[2, :, :1, :]  # (H, 1, d_k)
    row = first[2]  # (H, Tq, d_k)
    kept = torch.isclose(row, 2 * only_key, atol=1e-5).all(-1)
    dropped = (row == 0).all(-1)
    assert bool((kept | dropped).all()) and bool(kept.any()) and bool(dropped.any())
    # Inverted dropout is unbiased: the mean over 2,000 draws approaches the exact output.
    mean = torch.stack([attn(q, k, v, mask=mask) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, exact, atol=0.12, rtol=0.0)
    assert torch.equal(attn.eval()(q, k, v, mask=mask), exact)  # no dropout at inference
    with pytest.raises(ValueError, match="not both"):
        attn(q, k, v, mask=mask, causal=True)


def test_sinusoidal_encoding_matches_paper_formula() -> None:
    d, positions = 16, 50
    pe = PositionalEncoding(d, positions)(positions)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert torch.equal(PositionalEncoding(d, positions)(5, offset=10), pe[10:15])


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_is_causal(norm_first: bool) -> None:
    model = small_transformer(norm_first=norm_first)
    src = torch.randint(4, 50, (2, 6))
    tgt = torch.randint(4, 50, (2, 8))
    base = model(src, tgt)
    for t in range(1, 8):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % 46 + 4  # another real token
        out = model(src, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-4)


@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_does_not_change_real_tokens(norm_first: bool) -> None:
    model = small_transformer(norm_first=norm_first)
    src = torch.randint(4, 50, (1, 6))
    tgt = torch.randint(4, 50, (1, 5))
    alone = model(src, tgt)
    padded_src = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_tgt = torch.cat([tgt, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    together = model(padded_src, padded_tgt)
    torch.testing.assert_close(together[:, :5], alone, atol=1e-5, rtol=1e-5)
    # and in a batch with a longer sentence
    other_src, other_tgt = torch.randint(4, 50, (1, 10)), torch.randint(4, 50, (1, 8))
    batch = model(torch.cat([padded_src, other_src]), torch.cat([padded_tgt, other_tgt]))
    torch.testing.assert_close(batch[:1, :5], alone, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_equals_full_decoding() -> None:
    model = small_transformer()
    src = torch.randint(4, 50, (3, 7))
    src[1, 5:] = 0
    tgt = torch.randint(4, 50, (3, 6))
    full = torch.log_softmax(model(src, tgt), dim=-1)
    memory, mask = model.encode(src)
    cache = model.start_decoding(memory, mask, group=1, max_steps=tgt.size(1))
    for step in range(tgt.size(1)):
        lp = torch.log_softmax(model.decode_step(tgt[:, step], cache), dim=-1)
        torch.testing.assert_close(lp, full[:, step], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no room"):
        model.decode_step(tgt[:, 0], cache)


def test_beam_rows_share_the_source_and_follow_reordering() -> None:
    """With G rows per sentence, each row attends to its own sentence's source; moving and
    keeping rows (in any order) carries their prefixes and sources along."""
    model = small_transformer().eval()
    src = torch.randint(4, 50, (3, 6))
    src[1, 4:] = 0
    tgt = torch.randint(4, 50, (9, 4))  # 3 rows per sentence
    full = model(src.repeat_interleave(3, dim=0), tgt)  # (9, 4, V)
    memory, mask = model.encode(src)
    cache = model.start_decoding(memory, mask, group=3, max_steps=5)
    for step in range(3):
        logits = model.decode_step(tgt[:, step], cache)
        torch.testing.assert_close(logits, full[:, step], atol=1e-5, rtol=1e-5)
    # Row 4 takes over row 3's prefix; then sentence 0 (rows 0-2) leaves the batch and
    # sentence 2 moves into its place.
    cache.keep(np.array([0, 1, 2, 3, 3, 5, 6, 7, 8]), np.arange(3))
    cache.keep(np.array([6, 7, 8, 3, 4, 5]), np.array([2, 1]))
    moved = tgt[[6, 7, 8, 3, 3, 5]].clone()
    moved[4, 3] = tgt[4, 3]
    expected = model(src[[2, 1]].repeat_interleave(3, dim=0), moved)[:, 3]
    torch.testing.assert_close(
        model.decode_step(moved[:, 3], cache), expected, atol=1e-5, rtol=1e-5
    )


def test_caches_alive_together_have_their_own_buffers_and_a_dead_ones_is_reused() -> None:
    model = small_transformer().eval()
    src, tgt = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 4))
    memory, mask = model.encode(src)
    first = model.start_decoding(memory, mask, max_steps=4)
    second = model.start_decoding(memory, mask, max_steps=4)  # while the first is alive
    assert first.self_kv.data_ptr() != second.self_kv.data_ptr()
    for step in range(4):  # interleaved, the two caches do not disturb each other
        torch.testing.assert_close(
            model.decode_step(tgt[:, step], first), model.decode_step(tgt[:, step], second)
        )
    reused = first.self_kv.data_ptr()
    del first, second
    assert model.start_decoding(memory, mask, max_steps=4).self_kv.data_ptr() == reused


def test_padded_attention_reads_no_stale_buffer_values() -> None:
    """Steps with 4 to 15 keys read 16 (the source padded, the cache's undecoded positions
    masked); whatever an earlier batch left in the reused buffer (here NaN) does not leak."""
    assert [padded_keys(n) for n in (1, 3, 4, 9, 15, 16, 40)] == [1, 3, 16, 16, 16, 16, 40]
    model = small_transformer().eval()
    src, tgt = torch.randint(4, 50, (2, 5)), torch.randint(4, 50, (2, 7))
    src[1, 3:] = 0
    memory, mask = model.encode(src)
    with torch.inference_mode():
        clean = model.start_decoding(memory, mask, max_steps=7)
        expected = [model.decode_step(tgt[:, t], clean) for t in range(7)]
        clean.self_kv.fill_(torch.nan)  # what a diverged model could leave behind
        buffer = clean.self_kv.data_ptr()
        del clean
        cache = model.start_decoding(memory, mask, max_steps=7)
        assert cache.self_kv.data_ptr() == buffer  # the same (reused) storage
        assert cache.source_kv.size(-2) == MIN_KEYS  # 5 source positions read as 16
        for t in range(7):
            torch.testing.assert_close(model.decode_step(tgt[:, t], cache), expected[t])
        full = model(src, tgt)
    torch.testing.assert_close(torch.stack(expected, 1), full, atol=1e-5, rtol=1e-5)


def test_step_attention_is_the_formula_on_views_of_the_cache() -> None:
    """``attend`` flattens the leading dimensions for ``torch.bmm``: the same values as the
    broadcasting ``@``, with keys and values read through a narrowed view of a buffer."""
    torch.manual_seed(0)
    buffer = torch.randn(2, 6, 4, 20, 8)  # (K/V, R, H, T_max, d_k)
    k, v = buffer.narrow(3, 0, 16).unbind(0)  # not contiguous: 16 of 20 positions
    bias = torch.zeros(16)
    bias[9:] = -torch.inf
    q = torch.randn(6, 4, 1, 8)
    expected = ((q @ k.transpose(-2, -1)) * 8**-0.5 + bias).softmax(-1) @ v
    assert torch.equal(attend(q, k, v, bias), expected)
    # cross-attention: G = 3 queries per sentence, a source mask per sentence
    source, q = torch.randn(2, 2, 4, 5, 8), torch.randn(2, 4, 3, 8)
    mask_bias = torch.zeros(2, 1, 1, 5)
    mask_bias[1, ..., 3:] = -torch.inf
    expected = ((q @ source[0].transpose(-2, -1)) * 8**-0.5 + mask_bias).softmax(-1) @ source[1]
    assert torch.equal(attend(q, source[0], source[1], mask_bias), expected)


def test_tied_embeddings_and_parameter_count() -> None:
    tied, untied = small_transformer(tie_embeddings=True), small_transformer(tie_embeddings=False)
    assert tied.output_projection.weight is tied.embedding.tokens.weight
    assert untied.num_parameters()[0] - tied.num_parameters()[0] == 50 * 32


def test_heads_must_divide_d_model() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4, dropout=0.0)


def test_dropout_keeps_1_minus_p_scales_by_its_inverse_and_follows_torch_seed() -> None:
    drop = Dropout(0.3).train()
    x = torch.randn(200, 500, requires_grad=True)
    torch.manual_seed(7)
    y = drop(x)
    kept = y != 0
    # 100,000 Bernoulli(0.7) draws: sigma of the kept fraction is 0.00145; 0.005 is 3.4 sigma.
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    torch.manual_seed(7)
    assert torch.equal(drop(x), y)  # the mask follows torch's generator ...
    assert not torch.equal(drop(x), y)  # ... and changes from call to call
    assert torch.equal(drop.eval()(x), x)  # identity at inference
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_keep_mask_honours_p_and_zeroes_where_asked() -> None:
    torch.manual_seed(0)
    shape = torch.Size([400, 1000])
    for p in (0.1, 0.3, 0.5):
        mask = keep_mask(shape, p, torch.float32)
        values = mask.unique().tolist()
        assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
        # 400,000 draws: sigma of the dropped fraction is at most 0.0008; 0.004 is 5 sigma.
        assert abs((mask == 0).float().mean().item() - p) < 0.004
    where = torch.rand(shape) < 0.5
    mask = keep_mask(shape, 0.3, torch.bfloat16, where=where)
    assert mask.dtype == torch.bfloat16
    assert not mask[~where].any()  # zero wherever ``where`` is False ...
    assert abs((mask[where] == 0).float().mean().item() - 0.3) < 0.005  # ... dropout elsewhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_positive_is_greater_than_zero(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0, -1.0, 0.0, -0.0], [math.nan, math.inf, -math.inf, 1e-30]], dtype=dtype)
    for view in (x, x.t()):  # contiguous and not
        assert torch.equal(positive(view), view > 0)


def test_dropout_after_relu_is_relu_then_dropout_in_value_and_gradient() -> None:
    drop = Dropout(0.3).train()
    x = torch.randn(64, 300, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(5)
    fused = drop.after_relu(x)
    torch.manual_seed(5)
    separate = drop(torch.relu(x2))
    assert torch.equal(fused, separate)
    upstream = torch.randn(64, 300)
    fused.backward(upstream)
    separate.backward(upstream)
    assert torch.equal(x.grad, x2.grad)
    assert (fused == 0).float().mean().item() > 0.6  # about 1 - 0.5 · 0.7 = 0.65 zeroed
    assert torch.equal(drop.eval().after_relu(x), torch.relu(x))  # plain ReLU at inference


def test_dropout_is_torch_dropout_under_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(50, 40)
    torch.manual_seed(3)
    ours = Dropout(0.25).train()(x)
    torch.manual_seed(3)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.25, training=True))


def test_logits_at_positions_are_those_rows_of_the_full_logits() -> None:
    model = small_transformer()
    src = torch.randint(4, 50, (3, 7))
    tgt_in = torch.randint(4, 50, (3, 5))
    positions = torch.tensor([0, 1, 2, 5, 6, 10, 14])
    full = model(src, tgt_in).reshape(-1, 50)  # (B·T, V)
    torch.testing.assert_close(model(src, tgt_in, positions), full[positions])


def test_packed_projection_is_f_linear_row_invariant_and_a_snapshot() -> None:
    torch.manual_seed(0)
    weight = torch.randn(1000, 32)
    x = torch.randn(70, 32)
    project = PackedLinear(weight, rows=70)
    full = project(x)
    torch.testing.assert_close(full, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    for rows in (1, 3, 8, 17):  # a row's logits do not depend on the rows beside it
        assert torch.equal(project(x[:rows]), full[:rows])
    with torch.no_grad():
        weight.mul_(-2.0)  # a later change of the weight (an optimizer step)
    assert torch.equal(project(x), full)  # the batch's snapshot
    torch.testing.assert_close(PackedLinear(weight, 70)(x), -2.0 * full, atol=1e-5, rtol=1e-5)
    # Where packing does not apply, it is F.linear itself: other dtypes.
    half = PackedLinear(weight.bfloat16(), 70)
    assert half.packed is None and torch.equal(
        half(x.bfloat16()), F.linear(x.bfloat16(), weight.bfloat16())
    )


def test_decoding_after_an_optimizer_step_uses_the_new_weights() -> None:
    """Fused Adam changes weights without bumping their version: a decoding batch must not
    reuse a projection packed before the step (validation during training)."""
    model = small_transformer()
    src = torch.randint(4, 50, (2, 5))
    tokens = torch.full((2,), 1)

    def first_step_logits() -> torch.Tensor:
        with torch.inference_mode():
            memory, mask = model.encode(src)
            return model.decode_step(tokens, model.start_decoding(memory, mask, 1, 4))

    before = first_step_logits()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    model(src, torch.randint(4, 50, (2, 4))).sum().backward()
    optimizer.step()
    after = first_step_logits()
    memory, mask = model.encode(src)
    with torch.no_grad():
        want = model.decode(tokens[:, None], memory, mask)[:, 0]
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
