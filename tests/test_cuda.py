"""The CUDA path: numerics in each precision, train steps with a gradient scaler, checkpoints
across devices, cached decoding, and host syncs. Skipped (with the reason) where no CUDA
device is present; ``scripts/gpu_check.sh`` runs them on a GPU machine."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import small_transformer
from test_numerics import batch_of
from test_trainer import make_config
from transformer_mt.data.batching import pad
from transformer_mt.decoding import SearchOptions, beam_search, greedy_search
from transformer_mt.decoding.search import UncachedDecoder
from transformer_mt.formats.checkpoint import load_checkpoint
from transformer_mt.model.attention import ScaledDotProductAttention, attend
from transformer_mt.training.loss import OutputLayerLoss
from transformer_mt.training.precision import resolve_precision
from transformer_mt.training.setup import build_training
from transformer_mt.training.step import Outcome
from transformer_mt.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def ieee_fp32_matmuls() -> Iterator[None]:
    """Each test starts with IEEE fp32 matmuls (a run built with TF32 changes the global
    setting) and leaves them so."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_output_layer_loss_equals_cross_entropy(precision: str) -> None:
    """The fused projection + label-smoothed loss against F.cross_entropy, values and
    gradients, with inputs in each precision."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    dtype = DTYPES[precision]
    hidden = torch.randn(300, 64, device=CUDA, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(1000, 64, device=CUDA, generator=g).mul(0.1).to(dtype).requires_grad_()
    target = torch.randint(1, 1000, (300,), device=CUDA, generator=g)
    target[::7] = 0  # ignored positions
    loss, nll = OutputLayerLoss(0.1, ignore_index=0)(hidden, weight, target)
    loss.backward()
    grads = hidden.grad, weight.grad

    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logits = h @ w.T
    ref = F.cross_entropy(logits, target, ignore_index=0, label_smoothing=0.1, reduction="sum")
    ref_nll = F.cross_entropy(logits, target, ignore_index=0, reduction="sum")
    ref.backward()
    tol = TOLERANCE[precision]
    torch.testing.assert_close(loss.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(nll.float(), ref_nll, rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0].float(), h.grad, rtol=tol * 10, atol=tol)
    torch.testing.assert_close(grads[1].float(), w.grad, rtol=tol * 10, atol=tol)
    assert grads[0].dtype == dtype


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_equals_sdpa(dropout: float) -> None:
    """Our attention module against torch's SDPA (same RNG stream with dropout), and the
    written-out attention of a decoding step against SDPA."""
    q, k, v = (torch.randn(4, 2, 9, 16, device=CUDA) for _ in range(3))
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool, device=CUDA)
    mask[1, ..., 6:] = False
    attention = ScaledDotProductAttention(dropout).train()
    torch.manual_seed(3)
    ours = attention(q, k, v, mask=mask)
    torch.manual_seed(3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    torch.testing.assert_close(ours, ref)
    bias = torch.zeros(mask.shape, device=CUDA).masked_fill_(~mask, -torch.inf)
    step = F.scaled_dot_product_attention(q[:, :, :2], k, v, attn_mask=mask)
    torch.testing.assert_close(attend(q[:, :, :2], k, v, bias), step)


def test_auto_precision_is_bf16_with_tf32(corpus_root: Path) -> None:
    setup = build_training(make_config(corpus_root, "trainer.device=cuda"))
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    assert resolve_precision("auto", CUDA) == setup.update.precision == expected
    # TF32 for the fp32 rest of a bf16 run; an older GPU's fp32 keeps IEEE matmuls
    assert torch.get_float32_matmul_precision() == ("high" if expected == "bf16" else "highest")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_train_step_overflow_and_resume(corpus_root: Path, precision: str) -> None:
    """A train step in each half precision; fp16 with an injected overflow (the scaler skips
    the step and halves its scale), and its scale restored on resume."""
    cfg = make_config(
        corpus_root, "trainer.device=cuda", f"trainer.precision={precision}", "trainer.max_steps=40"
    )
    trainer = Trainer(cfg, corpus_root / "run")
    batch = batch_of(trainer.setup, range(0, 16))
    # fp16's scaler starts high and lowers its scale on overflows until a step applies.
    outcomes = [trainer.train_step([(batch, 1.0)]).outcome for _ in range(30)]
    assert Outcome.APPLIED in outcomes
    assert set(outcomes) <= (
        {Outcome.APPLIED, Outcome.OVERFLOW} if precision == "fp16" else {Outcome.APPLIED}
    )
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    scaler = trainer.update.scaler
    if precision == "fp16":
        assert scaler is not None
        scale = scaler.get_scale()
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        p = next(trainer.model.parameters())
        hook = p.register_hook(lambda grad: grad * float("inf"))
        assert trainer.train_step([(batch, 1.0)]).outcome is Outcome.OVERFLOW
        hook.remove()
        assert scaler.get_scale() == scale / 2
        assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    result = trainer.train()
    assert result.steps == 40
    if precision == "fp16":
        resumed = Trainer(
            make_config(
                corpus_root, "trainer.device=cuda", "trainer.precision=fp16", "trainer.max_steps=41"
            ),
            corpus_root / "run",
        )
        assert resumed.update.scaler.get_scale() == scaler.get_scale()  # type: ignore[union-attr]


def test_checkpoints_move_between_cpu_and_cuda(corpus_root: Path) -> None:
    gpu = Trainer(
        make_config(corpus_root, "trainer.device=cuda", "trainer.max_steps=2"), corpus_root / "gpu"
    ).train()
    state = load_checkpoint(gpu.best_checkpoint)  # weights_only, mapped to the CPU
    assert all(t.device.type == "cpu" for t in state["model"].values())
    cpu_run = corpus_root / "cpu"
    Trainer(make_config(corpus_root, "trainer.device=cpu", "trainer.max_steps=2"), cpu_run).train()
    resumed = Trainer(
        make_config(corpus_root, "trainer.device=cuda", "trainer.max_steps=4"), cpu_run
    )
    assert resumed.state.step == 2
    assert next(resumed.model.parameters()).device.type == "cuda"
    assert resumed.train().steps == 4


def test_cached_decoding_equals_uncached_on_cuda() -> None:
    model = small_transformer(vocab_size=30).to(CUDA)
    g = torch.Generator().manual_seed(1)
    src = pad([[*torch.randint(4, 30, (n,), generator=g).tolist(), 3] for n in (3, 7, 5, 9)], 0)
    src = src.to(CUDA)
    for options in (SearchOptions(beam_size=1), SearchOptions(beam_size=4, nbest=2)):
        search = greedy_search if options.beam_size == 1 else beam_search
        cached = search(model, src, 2, 3, options)  # type: ignore[operator]
        uncached = search(UncachedDecoder(model), src, 2, 3, options)  # type: ignore[operator]
        if options.beam_size == 1:
            assert cached == uncached
        else:
            assert [[h.tokens for h in n] for n in cached] == [
                [h.tokens for h in n] for n in uncached
            ]


def _syncs(fn: object) -> int:
    """The host syncs ``fn()`` makes, counted by CUDA's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()  # type: ignore[operator]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_one_host_sync_per_update_and_per_decoding_step(corpus_root: Path) -> None:
    setup = build_training(make_config(corpus_root, "trainer.device=cuda"))
    batch = batch_of(setup, range(0, 16))
    setup.update([(batch, 1.0)], batch.n_tgt_tokens)  # warm-up: allocations, the scaler
    assert _syncs(lambda: setup.update([(batch, 1.0)], batch.n_tgt_tokens)) == 1

    model = small_transformer(vocab_size=30).to(CUDA)
    src = torch.randint(4, 30, (8, 6), device=CUDA)
    src[:, -1] = 3
    options = SearchOptions(beam_size=4, max_len_a=0.0, max_len_b=12)
    steps: list[int] = []
    real = model.decode_step

    def counted(*args: object) -> torch.Tensor:
        steps.append(1)
        return real(*args)  # type: ignore[arg-type]

    model.decode_step = counted  # type: ignore[method-assign]
    for search in (greedy_search, beam_search):
        steps.clear()
        syncs = _syncs(lambda s=search: s(model, src, 2, 3, options))  # type: ignore[misc]
        # One copy per step, plus the budget and the final results once per batch.
        assert syncs <= len(steps) + 2, (search.__name__, syncs, len(steps))
