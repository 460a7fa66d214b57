"""The losses of design.md §4 against independent computations: brute force, finite differences, open_clip."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.testing import assert_close

from clip_dro.config import LOSS_NAMES
from clip_dro.errors import UserError
from clip_dro.losses import (LOSSES, CLIPLoss, ISogCLRLoss, LossIndexError, LossStateSizeError, RGCLgLoss,
                             SogCLRLoss, build_loss, check_rho, gamma_at)
from losses_reference import BruteRobustLoss, objective

# Small τ range and clip so that a few steps exercise the clip on G (both signs) and both τ bounds.
HYPER = dict(gamma=0.8, rho=1.5, tau_init=0.05, tau_min=0.048, tau_max=0.052, tau_lr=0.01, tau_momentum=0.9,
             tau_grad_clip=0.4)
NUM_IMAGES, NUM_TEXTS = 10, 12
# (image ids, text ids) per step: first visits, revisits, a duplicated image, then a duplicated text.
BATCHES = [
    ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    ([3, 6, 1, 7, 0, 8], [6, 3, 7, 1, 8, 0]),
    ([2, 2, 9, 4, 5, 6], [9, 10, 11, 4, 5, 2]),
    ([1, 3, 5, 7, 9, 0], [11, 11, 3, 1, 0, 6]),
]


def pairs(seed: int, n: int = 6, dim: int = 5, noise: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float64 image/text features, each text correlated with its image."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    text = image + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return F.normalize(image, dim=1), F.normalize(text, dim=1)


def ours_step(loss, image, text, image_ids, text_ids, dtype=torch.float32):
    """One step of a clip_dro loss; returns (value, image grad, text grad) in float64."""
    x = image.detach().to(dtype).clone().requires_grad_()
    t = text.detach().to(dtype).clone().requires_grad_()
    value = loss(x, t, torch.tensor(image_ids), torch.tensor(text_ids))
    value.backward()
    return value.detach().double(), x.grad.double(), t.grad.double()


def brute_step(brute, image, text, image_ids, text_ids):
    x = image.clone().requires_grad_()
    t = text.clone().requires_grad_()
    value = brute.step(x, t, image_ids, text_ids)
    value.backward()
    return value.detach(), x.grad, t.grad


def assert_state_matches(loss, brute, individual: bool) -> None:
    for side, state in (("image", loss.img), ("text", loss.txt)):
        visited = sorted(brute.s[side])
        assert state.visited.nonzero().flatten().tolist() == visited
        expected_s = torch.tensor([brute.s[side][i] for i in visited], dtype=torch.float64)
        assert_close(state.log_s[visited].double(), expected_s.log(), rtol=1e-5, atol=1e-5)
        if individual:
            assert_close(state.tau.double(), torch.tensor([brute.tau[side][i] for i in range(len(state.tau))],
                                                          dtype=torch.float64), rtol=1e-5, atol=1e-7)
            assert_close(state.m.double(), torch.tensor([brute.m[side][i] for i in range(len(state.m))],
                                                        dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_isogclr_matches_brute_force_over_several_steps():
    loss = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **HYPER)
    brute = BruteRobustLoss("individual", **HYPER)
    for step, (image_ids, text_ids) in enumerate(BATCHES):
        image, text = pairs(step)
        ours = ours_step(loss, image, text, image_ids, text_ids)
        expected = brute_step(brute, image, text, image_ids, text_ids)
        for got, want in zip(ours, expected):
            assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert_state_matches(loss, brute, individual=True)
    # the steps above really went through the clip on G (both ways) and both τ bounds
    assert min(brute.clipped.values()) > 0 and min(brute.bound_hits.values()) > 0


def test_rgclg_matches_brute_force_with_one_global_temperature():
    hyper = dict(HYPER, tau_grad_clip=2.0, tau_min=0.03, tau_max=0.06)
    loss = RGCLgLoss(NUM_IMAGES, NUM_TEXTS, **hyper)
    brute = BruteRobustLoss("global", **hyper)
    for step, (image_ids, text_ids) in enumerate(BATCHES):
        image, text = pairs(10 + step)
        for got, want in zip(ours_step(loss, image, text, image_ids, text_ids),
                             brute_step(brute, image, text, image_ids, text_ids)):
            assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert_state_matches(loss, brute, individual=False)
        assert loss.tau.item() == pytest.approx(brute.global_tau, rel=1e-6)
        assert loss.tau_m.item() == pytest.approx(brute.global_m, rel=1e-5)
    assert loss.tau_img.shape == (NUM_IMAGES,) and torch.all(loss.tau_img == loss.tau)
    assert brute.global_tau != HYPER["tau_init"]


def test_sogclr_equals_isogclr_with_frozen_temperature():
    frozen = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **dict(HYPER, tau_lr=0.0))
    sogclr = SogCLRLoss(NUM_IMAGES, NUM_TEXTS, **HYPER)
    for step, (image_ids, text_ids) in enumerate(BATCHES):
        image, text = pairs(20 + step)
        for got, want in zip(ours_step(sogclr, image, text, image_ids, text_ids),
                             ours_step(frozen, image, text, image_ids, text_ids)):
            assert_close(got, want, rtol=1e-6, atol=1e-8)
        assert_close(sogclr.img.log_s, frozen.img.log_s)
        assert_close(sogclr.txt.log_s, frozen.txt.log_s)
    assert torch.all(frozen.img.tau == HYPER["tau_init"])
    assert torch.all(sogclr.tau_txt == HYPER["tau_init"]) and sogclr.tau_txt.shape == (NUM_TEXTS,)


def test_surrogate_gradient_is_the_gradient_of_the_robust_objective():
    """At γ = 1 (s = g), ∇L equals ∇ of the robust objective, and G equals B·∂objective/∂τ_k (float64)."""
    n, rho = 5, 0.7
    image, text = pairs(30, n=n, dim=4)
    tau_image = [0.0625, 0.125, 0.09375, 0.25, 0.5]  # exact in float32, so state and reference agree
    tau_text = [0.5, 0.0625, 0.1875, 0.125, 0.25]
    loss = ISogCLRLoss(n, n, gamma=1.0, rho=rho, tau_init=0.1, tau_min=0.01, tau_max=1.0, tau_lr=0.0,
                       tau_momentum=1.0, tau_grad_clip=1e9)
    loss.img.tau.copy_(torch.tensor(tau_image))
    loss.txt.tau.copy_(torch.tensor(tau_text))
    ids = list(range(n))
    _, grad_image, grad_text = ours_step(loss, image, text, ids, ids, dtype=torch.float64)

    eps = 1e-6
    for features, grad, which in ((image, grad_image, 0), (text, grad_text, 1)):
        numeric = torch.zeros_like(features)
        for index in range(features.numel()):
            delta = torch.zeros_like(features).view(-1)
            delta[index] = eps
            delta = delta.view_as(features)
            args_plus = [image, text]
            args_minus = [image, text]
            args_plus[which] = features + delta
            args_minus[which] = features - delta
            numeric.view(-1)[index] = (objective(*args_plus, tau_image, tau_text, rho)
                                       - objective(*args_minus, tau_image, tau_text, rho)) / (2 * eps)
        assert_close(grad, numeric, rtol=1e-6, atol=1e-8)

    # β = 1 and no clip: m holds G, which is B times the partial derivative of the objective in τ_k
    for taus, state, side in ((tau_image, loss.img, 0), (tau_text, loss.txt, 1)):
        for k in range(n):
            plus, minus = list(taus), list(taus)
            plus[k] += 1e-7
            minus[k] -= 1e-7
            pair_plus = (plus, tau_text) if side == 0 else (tau_image, plus)
            pair_minus = (minus, tau_text) if side == 0 else (tau_image, minus)
            derivative = (objective(image, text, *pair_plus, rho) - objective(image, text, *pair_minus, rho)) / 2e-7
            assert state.m[k].item() == pytest.approx(n * derivative.item(), rel=1e-5, abs=1e-5)


def test_clip_equals_open_clip_cliploss():
    image, text = pairs(40, n=7, dim=6)
    image, text = image.float(), text.float()
    loss = CLIPLoss(7, 7, tau_init=0.07)
    value, grad_image, grad_text = ours_step(loss, image, text, list(range(7)), list(range(7)))

    log_scale = torch.tensor(math.log(1 / 0.07)).requires_grad_()
    x, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    reference = ClipLoss()(x, t, log_scale.exp())
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    assert_close(grad_image.float(), x.grad, rtol=1e-5, atol=1e-6)
    assert_close(grad_text.float(), t.grad, rtol=1e-5, atol=1e-6)
    assert loss.logit_scale.grad.item() == pytest.approx(log_scale.grad.item(), rel=1e-5)
    assert loss.tau_img.shape == (7,) and loss.tau_img[0].item() == pytest.approx(0.07)

    with torch.no_grad():
        loss.logit_scale.fill_(7.0)
    loss.after_optimizer_step()
    assert loss.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        loss.logit_scale.fill_(-1.0)
    loss.after_optimizer_step()
    assert loss.logit_scale.item() == 0.0


def extreme_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with h = +2 (anchor 0's positive is its worst text) and h = −2 (anchor 1): h/τ = ±400 at 0.005."""
    image, text = pairs(50, n=8, dim=3)
    image[0], text[0] = torch.tensor([1.0, 0, 0]), torch.tensor([-1.0, 0, 0])
    image[1], text[1] = torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0, 0])
    return image, text


EXTREME = dict(gamma=0.8, rho=1.0, tau_init=0.005, tau_min=0.005, tau_max=1.0, tau_lr=0.03, tau_momentum=0.9,
               tau_grad_clip=5.0)


def test_smallest_temperature_gives_finite_values_in_float32():
    loss = ISogCLRLoss(16, 16, **EXTREME)
    brute = BruteRobustLoss("individual", **EXTREME)
    ids = list(range(8))
    image, text = extreme_pairs()
    mild_image, mild_text = pairs(51, n=8, dim=3, noise=0.01)  # then a revisit where g is ~e^-400 times s
    for x, t in ((image, text), (mild_image, mild_text)):
        value, grad_image, grad_text = ours_step(loss, x, t, ids, ids)
        expected = brute_step(brute, x, t, ids, ids)
        for got, want in zip((value, grad_image, grad_text), expected):
            assert torch.isfinite(got).all()
            assert_close(got, want, rtol=2e-3, atol=1e-5)
        for state in (loss.img, loss.txt):
            assert all(torch.isfinite(buffer.float()).all() for buffer in state.buffers())
        assert_state_matches_loosely(loss, brute)
    assert brute_log_s_max(brute) > 300  # s reached e^300: beyond float32 unless kept in log form


def assert_state_matches_loosely(loss, brute) -> None:
    for side, state in (("image", loss.img), ("text", loss.txt)):
        visited = sorted(brute.s[side])
        expected = torch.tensor([math.log(brute.s[side][i]) for i in visited], dtype=torch.float64)
        assert_close(state.log_s[visited].double(), expected, rtol=1e-4, atol=1e-3)


def brute_log_s_max(brute) -> float:
    return max(math.log(s) for side in brute.s.values() for s in side.values())


def test_bf16_autocast_computes_in_float32():
    image, text = extreme_pairs()
    project = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        project.weight.copy_(torch.eye(3) + 0.01)
    ids = torch.arange(8)
    under_autocast, plain = ISogCLRLoss(16, 16, **EXTREME), ISogCLRLoss(16, 16, **EXTREME)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = F.normalize(project(image.float()), dim=1)
        t = F.normalize(project(text.float()), dim=1)
        x_half, t_half = x.bfloat16(), t.bfloat16()
        value = under_autocast(x_half, t_half, ids, ids)
    reference = plain(x_half.float(), t_half.float(), ids, ids)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == reference.item()  # the matmul ran in float32, not in bf16
    assert torch.equal(under_autocast.img.log_s, plain.img.log_s)
    assert torch.equal(under_autocast.txt.tau, plain.txt.tau)


def test_rho_check_and_one_warning_at_first_step():
    assert check_rho(6.0, 1024) is None  # log(1023) = 6.93
    message = check_rho(6.0, 128)
    assert message is not None and "log(B-1)" in message and "128" in message
    assert check_rho(math.log(7), 8) is not None
    image, text = pairs(60, n=8)
    ids = torch.arange(8)
    loss = ISogCLRLoss(8, 8, rho=6.0)
    with pytest.warns(UserWarning, match="rho = 6 >= log"):
        loss(image.float(), text.float(), ids, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(image.float(), text.float(), ids, ids)  # warned once only
        ISogCLRLoss(8, 8, rho=1.5)(image.float(), text.float(), ids, ids)  # 1.5 < log 7
        SogCLRLoss(8, 8, rho=6.0)(image.float(), text.float(), ids, ids)  # ρ unused without learned τ


def test_gamma_schedules():
    assert gamma_at(3.0, 0.8, "constant", 4) == 0.8
    assert gamma_at(0.0, 0.2, "cosine", 4) == 1.0
    assert gamma_at(2.0, 0.2, "cosine", 4) == pytest.approx(0.6)
    assert gamma_at(1.0, 0.2, "cosine", 4) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert gamma_at(4.0, 0.2, "cosine", 4) == pytest.approx(0.2)
    assert gamma_at(9.0, 0.2, "cosine", 4) == pytest.approx(0.2)
    with pytest.raises(UserError, match="gamma_schedule"):
        ISogCLRLoss(4, 4, gamma_schedule="linear")

    # the forward pass uses the scheduled γ: compare with the brute force run at that γ
    epoch, hyper = 1.5, dict(HYPER, gamma=0.3)
    expected_gamma = 0.3 + 0.7 * 0.5 * (1 + math.cos(math.pi * epoch / 2))
    loss = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **hyper, gamma_schedule="cosine", gamma_decay_epochs=2)
    brute = BruteRobustLoss("individual", **dict(hyper, gamma=expected_gamma))
    loss.set_epoch(epoch)
    for step, (image_ids, text_ids) in enumerate(BATCHES[:2]):
        image, text = pairs(70 + step)
        ours_step(loss, image, text, image_ids, text_ids)
        brute_step(brute, image, text, image_ids, text_ids)
    assert loss.stats()["gamma"] == pytest.approx(expected_gamma)
    assert_state_matches(loss, brute, individual=True)


def test_duplicate_ids_follow_the_documented_rule_in_any_order():
    """Repeated ids: one update per id from the mean over its positions, independent of batch order."""
    image_ids, text_ids = [4, 1, 4, 2, 4], [0, 3, 3, 1, 2]
    order = [3, 0, 4, 2, 1]
    hyper = dict(HYPER, rho=1.0, tau_min=0.01, tau_max=0.2)
    straight, permuted = ISogCLRLoss(6, 6, **hyper), ISogCLRLoss(6, 6, **hyper)
    brute = BruteRobustLoss("individual", **hyper)
    for step in range(2):  # first visit, then revisit of the duplicated ids
        image, text = pairs(80 + step, n=5)
        value, grad_image, grad_text = ours_step(straight, image, text, image_ids, text_ids)
        value_p, grad_image_p, grad_text_p = ours_step(permuted, image[order], text[order],
                                                       [image_ids[i] for i in order], [text_ids[i] for i in order])
        expected = brute_step(brute, image, text, image_ids, text_ids)
        assert_close(value, value_p, rtol=1e-5, atol=1e-7)
        assert_close(grad_image[order], grad_image_p, rtol=1e-4, atol=1e-7)
        assert_close(grad_text[order], grad_text_p, rtol=1e-4, atol=1e-7)
        for got, want in zip((value, grad_image, grad_text), expected):
            assert_close(got, want, rtol=1e-4, atol=1e-6)
        for name, buffer in straight.state_dict().items():
            assert_close(buffer, permuted.state_dict()[name], rtol=1e-4, atol=1e-7)
        assert_state_matches(straight, brute, individual=True)


def test_temperature_warmup_holds_tau_while_averages_update():
    hyper = dict(HYPER, tau_min=0.01, tau_max=0.2, tau_warmup_steps=2)
    loss = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **hyper)
    brute = BruteRobustLoss("individual", **hyper)
    for step, (image_ids, text_ids) in enumerate(BATCHES[:3]):
        image, text = pairs(90 + step)
        ours_step(loss, image, text, image_ids, text_ids)
        brute_step(brute, image, text, image_ids, text_ids)
        assert_state_matches(loss, brute, individual=True)
        held = torch.all(loss.img.tau == loss.img.tau[0]).item()
        assert held == (step < 2)
    assert loss.img.m.abs().sum() > 0 and loss.steps_done == 3


def test_resume_from_state_dict_is_exact_and_other_sizes_are_refused():
    hyper = dict(HYPER, tau_min=0.01, tau_max=0.2, tau_warmup_steps=3, gamma_schedule="cosine",
                 gamma_decay_epochs=2)
    steps = [(pairs(100 + i), BATCHES[i]) for i in range(4)]

    def run(loss, part):
        values = []
        for i, ((image, text), (image_ids, text_ids)) in part:
            loss.set_epoch(i / 2)
            values.append(ours_step(loss, image, text, image_ids, text_ids)[0])
        return values

    straight = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **hyper)
    values = run(straight, enumerate(steps))
    first = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **hyper)
    run(first, list(enumerate(steps))[:2])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **hyper)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.steps_done == 2
    resumed_values = run(resumed, list(enumerate(steps))[2:])
    assert torch.equal(torch.stack(values[2:]), torch.stack(resumed_values))
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name

    with pytest.raises(LossStateSizeError, match=f"num_images={NUM_IMAGES}, num_texts={NUM_TEXTS}") as error:
        ISogCLRLoss(NUM_IMAGES + 1, NUM_TEXTS, **hyper).load_state_dict(straight.state_dict())
    assert isinstance(error.value, UserError) and "num_images=11" in str(error.value)
    with pytest.raises(LossStateSizeError):
        CLIPLoss(3, 3).load_state_dict(CLIPLoss(4, 3).state_dict())


def test_indices_outside_the_state_are_clear_errors():
    image, text = pairs(110, n=4)
    loss = ISogCLRLoss(5, 6)
    with pytest.raises(LossIndexError, match="image_index 5 is outside the loss state \\[0, 5\\)") as error:
        loss(image.float(), text.float(), torch.tensor([0, 1, 5, 2]), torch.arange(4))
    assert isinstance(error.value, IndexError) and isinstance(error.value, UserError)
    with pytest.raises(LossIndexError, match="text_index -1"):
        loss(image.float(), text.float(), torch.arange(4), torch.tensor([0, -1, 2, 3]))
    with pytest.raises(LossIndexError, match="integer"):
        loss(image.float(), text.float(), torch.arange(4).float(), torch.arange(4))
    with pytest.raises(LossIndexError, match="shape"):
        loss(image.float(), text.float(), torch.arange(3), torch.arange(4))
    assert not loss.img.visited.any() and loss.steps_done == 0  # nothing was updated


def test_build_loss_names_views_and_state_size():
    classes = {"clip": CLIPLoss, "sogclr": SogCLRLoss, "isogclr": ISogCLRLoss, "rgclg": RGCLgLoss}
    for name, cls in classes.items():
        loss = build_loss(name, 7, 9, rho=3.0, tau_init=0.02, gamma_schedule="cosine", tau_warmup_steps=5)
        assert type(loss) is cls and loss.rho == 3.0
        assert loss.tau_img.shape == (7,) and loss.tau_txt.shape == (9,)
        assert loss.tau_img[3].item() == pytest.approx(0.02)
        assert max(loss.bytes_per_sample().values()) <= 24
    assert ISogCLRLoss(7, 9).bytes_per_sample() == {"image": 13, "text": 13}
    with pytest.raises(UserError, match="loss.name = 'simclr'"):
        build_loss("simclr", 3, 3)
    with pytest.raises(UserError, match="loss.tau_init"):
        build_loss("isogclr", 3, 3, tau_init=2.0)
    with pytest.raises(TypeError):
        build_loss("clip", 3, 3, temperature=0.1)


def test_every_configurable_loss_name_is_built_and_no_other():
    """config.LossName (what a config may say) and the factory's registry (what can be built) are one list."""
    assert tuple(LOSSES) == LOSS_NAMES


def test_stats_report_objective_and_temperatures():
    loss = ISogCLRLoss(NUM_IMAGES, NUM_TEXTS, **HYPER)
    image, text = pairs(120)
    image_ids, text_ids = BATCHES[0]
    value = ours_step(loss, image, text, image_ids, text_ids)[0]
    stats = loss.stats()
    expected = sum(HYPER["tau_init"] * (loss.img.log_s[i].item() + loss.txt.log_s[j].item() + 2 * HYPER["rho"])
                   for i, j in zip(image_ids, text_ids)) / len(image_ids)
    assert stats["objective"] == pytest.approx(expected, rel=1e-5)
    assert stats["loss"] == pytest.approx(value.item())
    assert stats["tau_img_mean"] == pytest.approx(loss.img.tau[image_ids].mean().item())
    assert stats["tau_txt_mean"] == pytest.approx(loss.txt.tau[text_ids].mean().item())
    assert stats["gamma"] == HYPER["gamma"]
