"""The architecture variants (model.positions, model.norm, model.activation): shapes, masks,
cached decoding, the papers' formulas, config errors, CTranslate2 export, and old configs."""

from __future__ import annotations

import math
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import WORDS
from transformer_mt.data.tokenizer import BOS_ID, PAD_ID, Tokenizer, train_sentencepiece
from transformer_mt.decoding import Translator
from transformer_mt.errors import ConfigError, UserError
from transformer_mt.export.ctranslate2 import build_spec, export_ctranslate2
from transformer_mt.formats.checkpoint import save_checkpoint, spm_bytes_to_tensor
from transformer_mt.model import (
    FeedForward,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    RotaryEmbedding,
    Transformer,
    TransformerEmbedding,
    build_model,
)
from transformer_mt.model.layers import make_norm, normalize, swiglu_hidden_size
from transformer_mt.training.config import check_model_variants

# A "model" config section as checkpoints written before the variants stored it.
OLD_CFG: dict[str, object] = dict(
    d_model=32,
    n_heads=4,
    n_encoder_layers=1,
    n_decoder_layers=2,
    d_ff=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation="relu",
    norm_first=True,
    tie_embeddings=True,
    max_positions=40,
)
VARIANTS = {
    "learned": dict(positions="learned"),
    "rope": dict(positions="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "gelu": dict(activation="gelu"),
    "swiglu": dict(activation="swiglu"),
    "untied output layer": dict(tie_embeddings=False),
    "rope+gelu (model=multi30k)": dict(positions="rope", activation="gelu"),
    "all-post-norm": dict(positions="rope", norm="rmsnorm", activation="swiglu", norm_first=False),
}
V, PAD = 50, PAD_ID


def variant(name: str, vocab_size: int = V, pad_id: int = PAD) -> Transformer:
    """A seeded, dropout-free tiny model of variant ``name``, in eval mode."""
    torch.manual_seed(0)
    return build_model({**OLD_CFG, **VARIANTS[name]}, vocab_size, pad_id).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(1, 10))) for _ in range(300)]
    return Tokenizer(train_sentencepiece(text + [t.upper() for t in text], 80, "unigram", 1.0))


def save(path: Path, model: Transformer, cfg: dict, tokenizer: Tokenizer) -> Path:
    """A checkpoint of ``model`` whose config's ``model`` section is ``cfg``."""
    config = {"model": cfg, "data": {"src_lang": "en", "tgt_lang": "xx"}}
    spm = spm_bytes_to_tensor(tokenizer.model_bytes)
    state = {"model": model.state_dict(), "config": config, "spm_model": spm}
    save_checkpoint(path, {**state, "step": 1, "epoch": 1})
    return path


def sources() -> torch.Tensor:
    """(3, 7) source ids; the second sentence ends in two padding positions."""
    src = torch.randint(4, V, (3, 7), generator=torch.Generator().manual_seed(1))
    src[1, 5:] = PAD
    return src


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shapes(name: str) -> None:
    model = variant(name)
    src, tgt = sources(), torch.randint(4, V, (3, 5))
    memory, mask = model.encode(src)
    assert memory.shape == (3, 7, 32) and mask.shape == (3, 1, 1, 7)
    assert model(src, tgt).shape == (3, 5, V)
    assert model.decode(tgt, memory, mask, project=False).shape == (3, 5, 32)
    logits = model(src, tgt, positions=torch.tensor([0, 4, 9]))
    assert logits.shape == (3, V)


@pytest.mark.parametrize("name", VARIANTS)
def test_padding_is_not_attended(name: str) -> None:
    model = variant(name)
    src, tgt = sources(), torch.randint(4, V, (3, 5))
    memory, mask = model.encode(src)
    # Whatever the padded positions hold, the real positions and the decoder do not see it.
    x = model.embedding(src)
    x[1, 5:] = torch.randn(2, 32) * 10
    changed = model.encoder(x, mask)
    torch.testing.assert_close(changed[1, :5], memory[1, :5], atol=1e-5, rtol=1e-5)
    noisy_memory = memory.clone()
    noisy_memory[1, 5:] = torch.randn(2, 32) * 10
    torch.testing.assert_close(
        model.decode(tgt, noisy_memory, mask), model.decode(tgt, memory, mask)
    )
    # A sentence alone gives what it gives padded in a batch.
    alone = model(src[1:2, :5], tgt[1:2])
    torch.testing.assert_close(model(src, tgt)[1:2], alone, atol=1e-5, rtol=1e-5)


def greedy(model: Transformer, src: torch.Tensor, steps: int, cached: bool) -> torch.Tensor:
    """Greedy decoding from BOS for ``steps`` steps: the logits of every step (B, steps, V),
    with or without the key/value cache."""
    memory, mask = model.encode(src)
    tokens = torch.full((src.size(0), 1), BOS_ID)
    cache = model.start_decoding(memory, mask, group=1, max_steps=steps) if cached else None
    logits = []
    for _ in range(steps):
        if cache is not None:
            step = model.decode_step(tokens[:, -1], cache)
        else:
            step = model.decode(tokens, memory, mask)[:, -1].float()
        logits.append(step)
        tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], dim=1)
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decoding_equals_uncached(name: str) -> None:
    model = variant(name)
    src = sources()
    cached, uncached = greedy(model, src, 8, True), greedy(model, src, 8, False)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.argmax(-1), uncached.argmax(-1))
    # Beam rows (G = 2 per sentence) read their own prefixes at the right positions.
    tgt = torch.randint(4, V, (6, 4))
    full = model(src.repeat_interleave(2, dim=0), tgt)
    memory, mask = model.encode(src)
    cache = model.start_decoding(memory, mask, group=2, max_steps=4)
    for t in range(4):
        torch.testing.assert_close(
            model.decode_step(tgt[:, t], cache), full[:, t], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name", VARIANTS)
def test_the_decoding_steps_plain_calls_give_the_modules_values_bit_for_bit(name: str) -> None:
    """A decoding step calls the norms, the feed-forward network and the embedding as plain
    functions (``normalize``, ``FeedForward.step``, ``TransformerEmbedding.step``)."""
    torch.manual_seed(0)
    cfg = {**OLD_CFG, **VARIANTS[name]}
    model = build_model(cfg, V, PAD).eval()
    x = torch.randn(5, 32)
    with torch.inference_mode():
        for norm in model.modules():  # trained-looking gains and biases, not 1 and 0
            if isinstance(norm, nn.LayerNorm | nn.RMSNorm):
                for p in norm.parameters():
                    p.normal_()
        for layer in model.decoder.layers:
            for sublayer in (layer.sublayer1, layer.sublayer2, layer.sublayer3):
                assert torch.equal(normalize(sublayer.norm, x), sublayer.norm(x))
            assert torch.equal(layer.feed_forward.step(x), layer.feed_forward(x))
        final = model.decoder.final_norm  # nn.Identity after post-norm layers
        assert torch.equal(normalize(final, x), final(x))
        ids = torch.randint(4, V, (5,))
        for position in (0, 3):
            expected = model.embedding(ids[:, None], position)[:, 0]
            assert torch.equal(model.embedding.step(ids, position), expected)


# -- the papers' formulas --------------------------------------------------------------------


def rope_complex(x: torch.Tensor, position: int) -> torch.Tensor:
    """RoFormer's rotation as complex numbers: dimension pair (j, j + d/2) is
    z_j = x_j + i·x_{j+d/2}, multiplied by e^{i·m·θ_j} with θ_j = 10000^(-2j/d)."""
    d = x.size(-1)
    theta = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(theta), position * theta)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_rope_is_the_complex_rotation_and_depends_on_relative_positions() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(d_k=8, max_positions=32)
    x = torch.randn(2, 3, 6, 8)  # (B, H, T, d_k)
    rotated = rope(x, offset=5)
    for t in range(6):
        torch.testing.assert_close(rotated[:, :, t], rope_complex(x[:, :, t], 5 + t))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> float:
        return float(rope(q[None], m)[0] @ rope(k[None], n)[0])

    assert score(3, 1) == pytest.approx(score(7, 5), abs=1e-5)
    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(q @ k), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    with pytest.raises(ValueError, match="max_positions=32"):
        rope(x, offset=30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_gives_forwards_values_bit_for_bit(dtype: torch.dtype) -> None:
    """Inference rotates in place (``rotate_``): a decoding step its one new position, the
    encoder whole sequences. Any difference from ``forward``, which training uses, would make
    a model decode differently from how it was trained and validated."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(d_k=8, max_positions=32)
    qkv = torch.randn(5, 3, 4, 8).to(dtype)  # (R, q/k/v, H, d_k) as a decoding step has them
    for position in (0, 1, 17, 31):
        expected = rope(qkv[:, :2, :, None], offset=position)
        rotated = qkv.clone()
        rope.rotate_(rotated[:, :2, :, None], position)  # a strided view, as in the step
        assert torch.equal(rotated[:, :2, :, None], expected)
        assert torch.equal(rotated[:, 2], qkv[:, 2])  # the values are not touched
    seqs = torch.randn(3, 2, 4, 6, 8).to(dtype).permute(1, 0, 2, 3, 4)  # (q/k, B, H, T, d_k)
    for offset in (0, 26):
        rotated = seqs.clone()
        rope.rotate_(rotated, offset)
        assert torch.equal(rotated, rope(seqs, offset=offset))
    with pytest.raises(ValueError, match="max_positions=32"):
        rope.rotate_(qkv[:, :2, :, None].clone(), 32)


def test_rope_rotates_self_attention_only_and_adds_no_absolute_positions() -> None:
    model = variant("rope")
    ids = torch.randint(4, V, (2, 6))
    assert model.embedding.positions is None
    torch.testing.assert_close(model.embedding(ids), model.embedding.tokens(ids) * math.sqrt(32))
    layer = model.decoder.layers[0]
    assert layer.cross_attn.rotary is None and model.encoder.layers[0].self_attn.rotary is not None
    assert layer.self_attn.rotary is model.encoder.layers[0].self_attn.rotary  # one table
    attn: MultiHeadAttention = layer.self_attn
    x = torch.randn(2, 6, 32)
    q, k, v = (attn._split_heads(proj(x)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q = torch.stack([rope_complex(q[:, :, t], t) for t in range(6)], dim=2)
    k = torch.stack([rope_complex(k[:, :, t], t) for t in range(6)], dim=2)
    expected = attn.out_proj(
        F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 32)
    )
    torch.testing.assert_close(attn(x, x, causal=True), expected, atol=1e-5, rtol=1e-5)
    weights = attn.attention_weights(x, x, causal=True)  # what attention maps show
    torch.testing.assert_close(
        weights,
        (q @ k.transpose(-2, -1) / math.sqrt(8))
        .masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -torch.inf)
        .softmax(-1),
        atol=1e-5,
        rtol=1e-5,
    )


def test_learned_positions_are_a_trained_table_added_at_an_offset() -> None:
    model = variant("learned")
    table = model.embedding.positions
    assert isinstance(table, LearnedPositionalEmbedding) and table.weight.shape == (40, 32)
    assert "embedding.positions.weight" in model.state_dict()
    ids = torch.randint(4, V, (2, 3))
    expected = model.embedding.tokens(ids) * math.sqrt(32) + table.weight[5:8]
    torch.testing.assert_close(model.embedding(ids, offset=5), expected)
    model(sources(), torch.randint(4, V, (3, 4))).sum().backward()
    assert table.weight.grad is not None and table.weight.grad[:4].abs().sum() > 0
    assert table.weight.grad[7:].abs().sum() == 0  # positions beyond the source and target


def test_rmsnorm_is_the_formula_and_replaces_every_norm() -> None:
    torch.manual_seed(0)
    norm = make_norm("rmsnorm", 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 4
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    for name in ("rmsnorm", "all-post-norm"):
        kinds = {type(m) for m in variant(name).modules()}
        assert nn.RMSNorm in kinds and nn.LayerNorm not in kinds


def test_swiglu_is_the_formula_with_about_the_weights_of_relu() -> None:
    torch.manual_seed(0)
    ffn = FeedForward(32, 96, dropout=0.0, activation="swiglu")
    assert ffn.linear1.out_features == swiglu_hidden_size(96) == 64
    w, v, w2 = ffn.linear1.weight, ffn.linear_v.weight, ffn.linear2.weight
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ffn(x), (F.silu(x @ w.T) * (x @ v.T)) @ w2.T)
    for d_model, d_ff in ((128, 256), (256, 1024), (512, 2048), (1024, 4096)):  # shipped
        relu = FeedForward(d_model, d_ff, dropout=0.0)
        glu = FeedForward(d_model, d_ff, dropout=0.0, activation="swiglu")
        n_relu, n_glu = (sum(p.numel() for p in m.parameters()) for m in (relu, glu))
        assert abs(n_glu - n_relu) / n_relu < 0.01, (d_model, d_ff, n_relu, n_glu)


# -- config errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("positions", "alibi", "sinusoidal, learned, rope"),
        ("norm", "batchnorm", "layernorm, rmsnorm"),
        ("activation", "tanh", "relu, gelu, swiglu"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.{key}='{value}' is not one of: {allowed}"):
        build_model({**OLD_CFG, key: value}, V, PAD)
    with pytest.raises(ConfigError, match=rf"model\.{key}="):  # before any data preparation
        check_model_variants(OmegaConf.create({"model": {**OLD_CFG, key: value}}), 32, 4)
    parts = {  # each module that takes the key checks it too
        "positions": lambda: TransformerEmbedding(V, 8, 10, 0.0, PAD, value),
        "norm": lambda: make_norm(value, 8),
        "activation": lambda: FeedForward(8, 16, 0.0, value),
    }
    with pytest.raises(ConfigError, match=rf"model\.{key}="):
        parts[key]()


def test_rope_needs_an_even_head_size() -> None:
    cfg = {**OLD_CFG, "d_model": 36, "n_heads": 4, "positions": "rope"}  # d_k = 9
    with pytest.raises(ConfigError, match=r"model\.positions=rope needs an even head size"):
        build_model(cfg, V, PAD)
    with pytest.raises(ConfigError, match=r"model\.positions=rope"):
        check_model_variants(OmegaConf.create({"model": cfg}), 36, 4)
    build_model({**cfg, "positions": "learned"}, V, PAD)  # fine without rope
    check_model_variants(OmegaConf.create({"model": OLD_CFG}), 32, 4)  # missing keys: defaults


# -- old checkpoints -----------------------------------------------------------------------------


def paper_state_dict_keys(n_encoder: int, n_decoder: int) -> list[str]:
    """The state_dict keys of a pre-norm model of the paper's architecture, in order."""
    wb = ("weight", "bias")
    attn = [f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in wb]
    ffn = [f"feed_forward.linear{i}.{w}" for i in (1, 2) for w in wb]
    enc = (
        [f"self_attn.{a}" for a in attn]
        + ffn
        + [f"sublayer{i}.norm.{w}" for i in (1, 2) for w in wb]
    )
    dec = [f"{m}.{a}" for m in ("self_attn", "cross_attn") for a in attn] + ffn
    dec += [f"sublayer{i}.norm.{w}" for i in (1, 2, 3) for w in wb]
    return [
        "embedding.tokens.weight",
        *(f"encoder.layers.{i}.{k}" for i in range(n_encoder) for k in enc),
        *(f"encoder.final_norm.{w}" for w in wb),
        *(f"decoder.layers.{i}.{k}" for i in range(n_decoder) for k in dec),
        *(f"decoder.final_norm.{w}" for w in wb),
        "output_projection.weight",
    ]


def test_old_config_builds_todays_model_and_decodes_identically(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    old = build_model(dict(OLD_CFG), V, PAD).eval()
    assert list(old.state_dict()) == paper_state_dict_keys(1, 2)
    kinds = {type(m).__name__ for m in old.modules()}
    assert {"LayerNorm", "ReLU", "PositionalEncoding"} <= kinds
    assert not kinds & {"RMSNorm", "SiLU", "RotaryEmbedding", "LearnedPositionalEmbedding"}
    torch.manual_seed(0)
    defaults = dict(positions="sinusoidal", norm="layernorm", activation="relu")
    explicit = build_model({**OLD_CFG, **defaults}, V, PAD).eval()
    assert repr(explicit) == repr(old)
    state = old.state_dict()
    assert all(torch.equal(state[k], v) for k, v in explicit.state_dict().items())
    # Through a checkpoint whose config lacks the new keys: the same outputs, bit for bit.
    torch.manual_seed(0)
    model = build_model(dict(OLD_CFG), tokenizer.vocab_size, tokenizer.pad_id).eval()
    checkpoint = save(tmp_path / "old.pt", model, dict(OLD_CFG), tokenizer)
    loaded = Translator.from_checkpoint(checkpoint).model
    src = torch.randint(4, tokenizer.vocab_size, (3, 7))
    assert torch.equal(greedy(loaded, src, 6, True), greedy(model, src, 6, True))


# -- CTranslate2 export --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper", *VARIANTS])
def test_ctranslate2_gives_our_log_probs_and_greedy_tokens(
    name: str, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    cfg = {**OLD_CFG, **VARIANTS.get(name, {})}
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.pad_id).eval()
    checkpoint = save(tmp_path / "model.pt", model, cfg, tokenizer)
    ct2 = ctranslate2.Translator(str(export_ctranslate2(checkpoint, tmp_path / "ct2")))
    piece = tokenizer.sp.id_to_piece
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=n)) for n in (2, 5, 9, 14)]
    src_ids = tokenizer.encode(lines)
    src = torch.full((4, max(map(len, src_ids)) + 1), tokenizer.pad_id)
    for row, ids in enumerate(src_ids):
        src[row, : len(ids) + 1] = torch.tensor([*ids, tokenizer.eos_id])
    # Teacher-forced: the log-probability of every target token.
    tgt_ids = tokenizer.encode([s.upper() for s in reversed(lines)])
    scored = ct2.score_batch(
        [[piece(t) for t in s] for s in src_ids], [[piece(t) for t in s] for s in tgt_ids]
    )
    for row, (tgt, result) in enumerate(zip(tgt_ids, scored, strict=True)):
        tgt_in = torch.tensor([[tokenizer.bos_id, *tgt]])
        with torch.no_grad():
            lp = model(src[row : row + 1, : len(src_ids[row]) + 1], tgt_in).log_softmax(-1)[0]
        expected = [lp[i, t].item() for i, t in enumerate([*tgt, tokenizer.eos_id])]
        np.testing.assert_allclose(result.log_probs, expected, atol=1e-4)
    # Greedy, step by step from CTranslate2's cache: the same tokens and log-probabilities.
    with torch.no_grad():
        logits = greedy(model, src, 12, cached=True).log_softmax(-1)  # (4, 12, V)
    for row, ids in enumerate(src_ids):
        steps = list(
            ct2.generate_tokens(
                [piece(t) for t in ids],
                max_decoding_length=12,
                min_decoding_length=0,
                sampling_topk=1,
                return_log_prob=True,
            )
        )
        ours = logits[row].argmax(-1).tolist()
        assert [s.token_id for s in steps] == ours[: len(steps)]
        assert len(steps) == 12 or ours[len(steps)] == tokenizer.eos_id
        np.testing.assert_allclose(
            [s.log_prob for s in steps],
            [logits[row, t, s.token_id].item() for t, s in enumerate(steps)],
            atol=1e-4,
        )


def test_export_names_the_key_it_cannot_represent(tokenizer: Tokenizer) -> None:
    model = build_model(dict(OLD_CFG), tokenizer.vocab_size, tokenizer.pad_id)
    model.encoder.layers[0].feed_forward.activation = nn.Tanh()
    with pytest.raises(UserError, match=r"model\.activation"):
        build_spec(model, tokenizer)
    model = build_model(dict(OLD_CFG), tokenizer.vocab_size, tokenizer.pad_id)
    model.embedding.positions = None  # no table, and no rotary either
    with pytest.raises(UserError, match=r"model\.positions"):
        build_spec(model, tokenizer)
