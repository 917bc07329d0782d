"""Loss, learning-rate schedule and checkpoints."""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.formats.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    spm_bytes_to_tensor,
    spm_tensor_to_bytes,
)
from transformer_mt.training.loss import OutputLayerLoss, label_smoothed_nll_loss
from transformer_mt.training.schedule import inverse_sqrt_schedule, lr_schedule, planned_updates


def test_label_smoothed_loss_matches_direct_computation() -> None:
    torch.manual_seed(0)
    n, v, eps, pad = 12, 9, 0.1, 0
    logits = torch.randn(n, v)
    target = torch.randint(1, v, (n,))
    target[[2, 7]] = pad
    loss, nll = label_smoothed_nll_loss(logits, target, eps, ignore_index=pad)

    # Direct: cross entropy against the smoothed distribution q = (1-ε)·onehot + ε/V.
    expected_loss, expected_nll = 0.0, 0.0
    for i in range(n):
        if target[i] == pad:
            continue
        logp = torch.log_softmax(logits[i], dim=-1)
        q = torch.full((v,), eps / v)
        q[target[i]] += 1 - eps
        expected_loss += float(-(q * logp).sum())
        expected_nll += float(-logp[target[i]])
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert nll.item() == pytest.approx(expected_nll, rel=1e-5)
    reference = F.cross_entropy(
        logits, target, ignore_index=pad, label_smoothing=eps, reduction="sum"
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_gradient_matches_autograd_of_cross_entropy(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    n, v, eps, pad = 10, 7, 0.2, 3
    target = torch.randint(0, v, (n,))
    target[[0, 5]] = pad
    base = torch.randn(n, v).to(dtype)
    fused_in = base.clone().requires_grad_()
    ref_in = base.clone().float().requires_grad_()
    loss, nll = label_smoothed_nll_loss(fused_in, target, eps, ignore_index=pad)
    (2.0 * loss + 0.5 * nll).backward()  # both outputs carry gradient
    ref_loss = F.cross_entropy(
        ref_in, target, ignore_index=pad, label_smoothing=eps, reduction="sum"
    )
    ref_nll = F.cross_entropy(ref_in, target, ignore_index=pad, reduction="sum")
    (2.0 * ref_loss + 0.5 * ref_nll).backward()
    assert fused_in.grad is not None and ref_in.grad is not None
    assert fused_in.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused_in.grad.float(), ref_in.grad, atol=tol, rtol=tol)
    assert fused_in.grad[[0, 5]].abs().sum() == 0  # ignored rows get no gradient
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)


def test_fused_loss_gradient_is_exact_for_far_tail_log_probs() -> None:
    # Without label smoothing a trained model puts much of the vocabulary below log-prob -87,
    # where the backward clamps before exp (float32 subnormals); those gradients must match.
    torch.manual_seed(3)
    n, v, eps = 8, 50, 0.0  # no smoothing: the tail's gradient is its softmax alone
    target = torch.randint(1, v, (n,))
    base = torch.randn(n, v) * 40 - 100.0  # log-probs spread from about -250 to 0
    base[torch.arange(n), target] = 20.0
    fused_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, _ = label_smoothed_nll_loss(fused_in, target, eps, ignore_index=0)
    loss.backward()
    F.cross_entropy(ref_in, target, label_smoothing=eps, reduction="sum").backward()
    assert fused_in.grad is not None and ref_in.grad is not None
    assert (F.log_softmax(base, -1) < -87.0).float().mean() > 0.5  # the tail is exercised
    torch.testing.assert_close(fused_in.grad, ref_in.grad, atol=1e-37, rtol=1e-5)


def test_fused_loss_passes_gradcheck_in_double_precision() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 0, 4, 2, 0, 3])
    assert torch.autograd.gradcheck(
        lambda x: label_smoothed_nll_loss(x, target, 0.1, ignore_index=0), (logits,)
    )


def _projection_case(n: int, v: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    hidden, weight = torch.randn(n, d), torch.randn(v, d) * 0.5
    target = torch.randint(1, v, (n,))
    target[::4] = 0  # padding rows
    return hidden, weight, target


def test_output_layer_loss_equals_linear_then_loss_in_value_and_gradient() -> None:
    criterion = OutputLayerLoss(0.1, ignore_index=0)
    # Growing, then shrinking batches: the kept buffer is reused as a view each time.
    for n, seed in ((9, 0), (23, 1), (5, 2)):
        hidden, weight, target = _projection_case(n, 11, 6, seed)
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, nll = criterion(h1, w1, target)
        (2.0 * loss + 0.5 * nll).backward()  # both outputs carry gradient
        ref_loss, ref_nll = label_smoothed_nll_loss(F.linear(h2, w2), target, 0.1, 0)
        (2.0 * ref_loss + 0.5 * ref_nll).backward()
        torch.testing.assert_close((loss, nll), (ref_loss, ref_nll), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)
        assert h1.grad is not None and h1.grad[::4].abs().sum() == 0  # padding: no gradient


def test_output_layer_loss_grows_its_buffer_with_headroom_and_reuses_it() -> None:
    criterion = OutputLayerLoss(0.1, ignore_index=0)
    vocab = 6

    def buffer_after(n: int) -> tuple[int, int]:
        hidden, weight, target = _projection_case(n, vocab, 4, n)
        loss, _ = criterion(hidden, weight.requires_grad_(), target)
        loss.backward()
        assert list(criterion._buffers) == [torch.float32]  # fp32: no second buffer
        buffer = criterion._buffers[torch.float32]
        return buffer.data_ptr(), buffer.numel()

    first = buffer_after(9)
    assert first[1] == 512 * vocab  # rows rounded up to a multiple of 512
    assert buffer_after(500) == first  # a larger batch within the headroom: same memory
    grown = buffer_after(700)
    assert grown[1] == 1024 * vocab
    assert buffer_after(30) == grown  # shrinking never reallocates


def test_output_layer_loss_frees_its_old_buffer_before_allocating_a_larger_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    criterion = OutputLayerLoss(0.1, ignore_index=0)
    hidden, weight, target = _projection_case(9, 6, 4, 9)
    criterion(hidden, weight.requires_grad_(), target)[0].backward()
    old = weakref.ref(criterion._buffers[torch.float32])
    old_alive_at_allocation: list[bool] = []
    real_empty = torch.empty

    def recording_empty(*args: object, **kwargs: object) -> torch.Tensor:
        old_alive_at_allocation.append(old() is not None)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    hidden, weight, target = _projection_case(700, 6, 4, 700)
    criterion(hidden, weight.requires_grad_(), target)[0].backward()
    assert old_alive_at_allocation == [False]  # one allocation, with the old buffer gone


def test_output_layer_loss_under_bf16_autocast_matches_linear_then_loss() -> None:
    criterion = OutputLayerLoss(0.1, ignore_index=0)
    half_buffers = set()
    for n, seed in ((12, 3), (20, 4)):  # the second call reuses both kept buffers
        hidden, weight, target = _projection_case(n, 9, 8, seed)
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = criterion(h1, w1, target)
            logits = F.linear(h2, w2)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        ref_loss, _ = label_smoothed_nll_loss(logits, target, 0.1, 0)
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        assert h1.grad is not None and h1.grad.dtype == torch.float32  # back through the casts
        torch.testing.assert_close(h1.grad, h2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)
        assert set(criterion._buffers) == {torch.float32, torch.bfloat16}
        half_buffers.add(criterion._buffers[torch.bfloat16].data_ptr())
    assert len(half_buffers) == 1  # the bf16 logits and gradient: one buffer, kept


def test_output_layer_loss_refuses_to_backpropagate_a_call_whose_buffer_was_reused() -> None:
    criterion = OutputLayerLoss(0.1, ignore_index=0)
    hidden, weight, target = _projection_case(8, 10, 4, 4)
    weight.requires_grad_()
    first, _ = criterion(hidden, weight, target)
    criterion(hidden, weight, target)  # overwrites the buffer the first call saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


def test_output_layer_loss_in_inference_mode_leaves_training_calls_working() -> None:
    criterion = OutputLayerLoss(0.0, ignore_index=0)
    hidden, weight, target = _projection_case(7, 10, 4, 5)
    with torch.inference_mode():
        expected, _ = criterion(hidden, weight, target)
    weight.requires_grad_()
    loss, _ = criterion(hidden, weight, target)  # no inference tensor was kept for this one
    loss.backward()
    assert torch.equal(loss.detach(), expected) and weight.grad is not None


def test_warmup_schedule_matches_paper_formula() -> None:
    d_model, warmup = 512, 4000
    peak = d_model**-0.5 * warmup**-0.5
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=peak)
    scheduler = inverse_sqrt_schedule(optimizer, warmup)
    for step_num in range(1, 12001):  # the paper's step_num counts updates from 1
        if step_num in (1, 2, 100, 3999, 4000, 4001, 8000, 12000):
            paper = d_model**-0.5 * min(step_num**-0.5, step_num * warmup**-1.5)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(paper, rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_cosine_schedule_matches_its_formula() -> None:
    peak, floor_lr, warmup, decay = 2e-3, 1e-4, 100, 1100
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=peak)
    scheduler = lr_schedule(optimizer, "cosine", warmup, decay, floor_lr)
    seen = {}
    for step_num in range(1, 1301):  # update step_num runs at the lr set before it
        seen[step_num] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step_num in (1, 50, 100):  # linear warmup, as the paper's
        assert seen[step_num] == pytest.approx(peak * step_num / warmup, rel=1e-9)
    for step_num in (101, 350, 600, 850, 1099):
        progress = (step_num - warmup) / (decay - warmup)
        expected = floor_lr + (peak - floor_lr) * (1 + math.cos(math.pi * progress)) / 2
        assert seen[step_num] == pytest.approx(expected, rel=1e-9)
    assert seen[600] == pytest.approx((peak + floor_lr) / 2)  # halfway down
    assert all(seen[s] == pytest.approx(floor_lr) for s in (1100, 1101, 1300))  # then it stays
    assert all(seen[s] > seen[s + 1] for s in range(100, 1099))  # falls at every update


def test_planned_updates_count_each_epochs_short_last_update() -> None:
    assert planned_updates(133, 1, 30, None) == 3990
    assert planned_updates(133, 2, 30, None) == 30 * 67  # 66 full updates and one short
    assert planned_updates(133, 2, 30, 1000) == 1000  # max_steps comes first
    assert planned_updates(133, 1, 30, 5000) == 3990


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("linear", 10, None, 0.0), "optim.schedule"),
        (("cosine", 10, None, 0.0), "optim.decay_steps"),
        (("cosine", 10, 10, 0.0), "optim.decay_steps"),
        (("cosine", 10, 20, 1e-3), "optim.min_lr"),  # not below the peak
        (("cosine", 10, 20, -1e-5), "optim.min_lr"),
        (("inverse_sqrt", 10, 20, 0.0), "optim.decay_steps"),  # would do nothing
        (("inverse_sqrt", 10, None, 1e-5), "optim.min_lr"),
        (("inverse_sqrt", 0, None, 0.0), "optim.warmup_steps"),
    ],
)
def test_schedule_settings_that_cannot_work_name_the_key(
    args: tuple[str, int, int | None, float], key: str
) -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        lr_schedule(optimizer, *args)


def test_checkpoint_roundtrip_with_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    spm = b"\x00\x01fake-sentencepiece\xff"
    state = {
        "model": model.state_dict(),
        "config": {"model": {"d_model": 3}, "x": [1, "a", None]},
        "spm_model": spm_bytes_to_tensor(spm),
        "step": 7,
        "epoch": 1,
    }
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    assert spm_tensor_to_bytes(loaded["spm_model"]) == spm
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files left


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    spm = torch.zeros(1, dtype=torch.uint8)
    entries = {"model": {}, "config": {"model": {}}, "spm_model": spm, "step": 0, "epoch": 0}
    save_checkpoint(good, entries)
    assert load_checkpoint(good)["step"] == 0  # well formed: only its copies below are bad
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a transformer_mt checkpoint"):
        load_checkpoint(other)


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        {
            "model": {},
            "config": {"model": {}},
            "spm_model": torch.zeros(1, dtype=torch.uint8),
            "step": 1,
            "epoch": 1,
        },
    )
    with pytest.raises(ValueError):
        save_checkpoint(path, {"model": {}})
    assert load_checkpoint(path)["step"] == 1
