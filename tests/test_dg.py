"""The cross-domain recipe's components, each against what it claims: Pro-RandConv as published (per batch,
random-field offsets, a reference built from torchvision's deform_conv2d), RandConv's per-batch identity,
matched outputs, the stabilizers, the clean-anchored JSD, and a DG recipe that trains on every seed."""
import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from common import Config, UserError
from common.augment import (amplitude_perturbation, augment, draw, match, noise_texture, progressive_random_convolution,
                            random_convolution, smooth_field, stream)
from common.training import (Progress, clean_view, evaluate, fit, jensen_shannon, loss_function, make_optimizer, make_schedule,
                          scheduled, train_epoch, training_loss)
from common.models import IBN, MixStyle, resnet18
from conftest import ROOT, train_in_memory


def images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_pro_randconv(x, key, cfg):
    """Pro-RandConv from its definition, one image at a time: L applications of the same block, each a
    torchvision deform_conv2d (zeros padding) + instance norm + per-channel affine + tanh, mapped to [0, 1].
    The block's parameters are drawn from the same named streams as the batched implementation."""
    b, c, h, w = x.shape
    drawn = (draw(key, "prorandconv", 4, b, x.device) + 1) / 2
    weights = torch.randn(b, c, c, 3, 3, generator=stream(key, "prorandconv_weights", x.device))
    offsets = torch.randn(b, 18, h, w, generator=stream(key, "prorandconv_offsets", x.device))
    gain, shift = (torch.randn(2, b, c, 1, 1, generator=stream(key, "prorandconv_affine", x.device))
                   * cfg.prorandconv_affine).unbind(0)
    taps = torch.arange(3.0) - 1
    out = []
    for i in range(b):
        layers = int((drawn[i, 1] * cfg.prorandconv_layers).floor().clamp(max=cfg.prorandconv_layers - 1)) + 1
        window = torch.exp(-(taps.view(3, 1) ** 2 + taps.view(1, 3) ** 2) / (2 * drawn[i, 2].clamp(min=1e-2) ** 2))
        kernel = weights[i] * window / (c * 9) ** 0.5
        # deform_conv2d takes (dy, dx) pairs per tap, as deformable_taps does
        offset = offsets[i:i + 1] * drawn[i, 3] * cfg.prorandconv_offset
        y = x[i:i + 1]
        for _ in range(layers):
            y = deform_conv2d(y, offset, kernel, padding=1)
            y = torch.tanh(F.instance_norm(y) * gain[i] + shift[i])
        out.append((y + 1) / 2)
    return torch.cat(out)


def test_pro_randconv_equals_l_applications_of_one_deform_conv2d_block():
    cfg = Config(prorandconv=1.0, prorandconv_layers=4, prorandconv_padding="zeros")
    x = images(6)
    torch.testing.assert_close(progressive_random_convolution(x, 11, cfg), reference_pro_randconv(x, 11, cfg),
                               atol=2e-5, rtol=1e-4)


def test_per_batch_mode_applies_one_block_to_the_whole_batch():
    x = images(1).expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    per_batch = progressive_random_convolution(x, 3, Config(prorandconv=1.0, prorandconv_per="batch"))
    per_image = progressive_random_convolution(x, 3, Config(prorandconv=1.0))
    assert all(torch.allclose(per_batch[0], y, atol=1e-6) for y in per_batch)  # one virtual domain
    assert not torch.allclose(per_image[0], per_image[1], atol=1e-3)
    assert not torch.allclose(per_batch[0], x[0], atol=1e-2)


def test_randconv_per_batch_is_one_kernel_or_the_identity_for_the_whole_batch():
    x = images(1).expand(8, -1, -1, -1).contiguous()
    outcomes = []
    for key in range(20):
        out = random_convolution(x, key, Config(randconv=0.5, randconv_per="batch"))
        assert all(torch.allclose(out[0], y, atol=1e-6) for y in out)
        outcomes.append(torch.equal(out, x))
    assert 3 < sum(outcomes) < 17  # the whole batch stays clean about half the time


def test_random_field_offsets_are_smooth_and_white_ones_are_not():
    noise = torch.randn(4, 18, 32, 32, generator=torch.Generator().manual_seed(0))

    def neighbour_correlation(field):
        a, b = field[..., :, :-1].flatten(), field[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    field = smooth_field(noise, 4.0)
    assert neighbour_correlation(field) > 0.9 and abs(neighbour_correlation(noise)) < 0.05
    assert torch.allclose(field.std((2, 3)), torch.ones(4, 18), atol=1e-4)  # same scale as the white offsets
    a = progressive_random_convolution(images(4), 5, Config(prorandconv=1.0, prorandconv_offsets="field"))
    b = progressive_random_convolution(images(4), 5, Config(prorandconv=1.0))
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_matched_outputs_take_each_clean_images_mean_and_std():
    x = images(6)
    out = torch.rand(6, 3, 32, 32) * 0.1 + 0.8
    matched = match(out, x, "matched")
    torch.testing.assert_close(matched.mean((2, 3)), x.mean((2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matched.std((2, 3)), x.std((2, 3)), atol=1e-5, rtol=1e-4)
    assert torch.equal(match(out, x, "unit"), out)
    through = augment((x * 255).to(torch.uint8), Config(prorandconv=1.0, dg_output="matched"), 2)
    clean = augment((x * 255).to(torch.uint8), Config(), 2)
    torch.testing.assert_close(through.mean((2, 3)), clean.mean((2, 3)), atol=1e-4, rtol=1e-4)


def digit_on_black(n):
    """uint8 light-on-black "digits" (a bar), as MNIST and USPS show theirs."""
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 6:26, 13:19] = 255
    return x


def test_background_puts_a_texture_behind_a_digit_that_stays_visible():
    out = augment(digit_on_black(16), Config(background=1.0), 4)
    behind, stroke = out[:, :, 2:30, 0:8], out[:, :, 10:22, 14:18]
    assert (behind.std((2, 3)) > 0.01).all()                         # a texture, not a flat colour
    assert not torch.allclose(behind[0], behind[1])                  # every image its own
    contrast = (stroke.mean((2, 3)) - behind.mean((2, 3))).abs().max(1).values
    assert (contrast > 0.2).all()                                    # the digit is still there to read
    assert torch.equal(augment(digit_on_black(16), Config(background=1.0), 4), out)  # seeded by the key
    assert torch.equal(augment(digit_on_black(16), Config(background=0.0), 4), digit_on_black(16) / 255)


def test_noise_texture_has_a_falling_spectrum():
    texture = noise_texture(64, 32, 32, torch.Generator().manual_seed(0), "cpu")
    assert texture.min() >= 0 and texture.max() <= 1
    power = torch.fft.rfft2(texture - texture.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    assert power[1:3, 1:3].mean() > 10 * power[12:16, 12:16].mean()  # low frequencies dominate, as in photos


def test_dg_ramp_scales_only_the_cross_domain_augmentations_over_its_span():
    cfg = Config(rotate=15, invert=0.5, prorandconv=0.8, background=0.5, dg_ramp=0.4)
    assert scheduled(cfg, 0.0).prorandconv == 0.0 and scheduled(cfg, 0.0).background == 0.0
    assert scheduled(cfg, 0.0).rotate == 15
    half = scheduled(cfg, 0.2)
    assert (half.invert, half.prorandconv) == pytest.approx((0.25, 0.4))
    assert scheduled(cfg, 0.4) is cfg and scheduled(dataclasses.replace(cfg, dg_ramp=0.0), 0.0).prorandconv == 0.8


def test_consistency_decay_lowers_the_weight_linearly_and_the_loss_uses_the_step_weight():
    cfg = Config(width=8, rotate=15, background=0.5, consistency=5, consistency_clean=True, consistency_decay=0.8,
                 amp="off")
    weights = [scheduled(cfg, done).consistency for done in (0.0, 0.5, 1.0)]
    assert weights == pytest.approx([5.0, 3.0, 1.0]) and scheduled(cfg, 0.5).background == 0.5
    torch.manual_seed(0)
    model, xb, yb = resnet18(width=8).eval(), torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8)
    losses = [training_loss(model, xb, yb, scheduled(cfg, done), 0, loss_function(cfg), "fp32")[0].item()
              for done in (0.0, 0.5, 1.0)]
    # Same views and logits at every step: the loss moves only by the weight times the same JSD (> 0).
    assert losses[0] > losses[1] > losses[2] and losses[0] - losses[1] == pytest.approx(losses[1] - losses[2], rel=1e-4)
    with pytest.raises(UserError, match="--consistency-decay must be in"):
        Config(consistency=5, rotate=15, consistency_decay=1.0)


def test_norm_and_bias_parameters_are_not_decayed_when_asked():
    model = resnet18(width=8)
    groups = make_optimizer(Config(decay_norm_bias=False), model).param_groups
    decayed, not_decayed = groups
    assert decayed["weight_decay"] == 5e-4 and not_decayed["weight_decay"] == 0.0
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert bn <= {id(p) for p in not_decayed["params"]} and not bn & {id(p) for p in decayed["params"]}
    assert all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])
    assert len(make_optimizer(Config(), model).param_groups) == 1


def test_gradient_clipping_bounds_the_first_step():
    torch.manual_seed(0)
    x = (images(32) * 255).to(torch.uint8)
    y = torch.arange(32) % 10
    for clip, bound in ((1e-3, True), (0.0, False)):
        model = resnet18(width=8)
        cfg = Config(clip_grad=clip, weight_decay=0.0, epochs=1, batch_size=32, amp="off")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = make_optimizer(cfg, model)
        schedule = make_schedule(cfg, optimizer, 1)
        train_epoch(model, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False), cfg, (x, y), 0, "fp32")
        moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
        lr = cfg.lr / 25  # the one-cycle schedule's first step
        # Nesterov's first step moves by lr * (1 + momentum) * the gradient
        assert (moved <= lr * 1.9 * clip * 1.01) == bound, (clip, moved)


def test_clean_anchored_consistency_is_cross_entropy_on_the_clean_view_plus_jsd_over_all():
    torch.manual_seed(0)
    model = resnet18(width=8).eval()
    x = (images(6) * 255).to(torch.uint8)
    y = torch.arange(6)
    cfg = Config(rotate=10, prorandconv=0.9, prorandconv_layers=2, consistency=2.0, views=3, consistency_clean=True)
    loss, first = training_loss(model, x, y, cfg, 4, loss_function(cfg), "fp32")
    clean = augment(x, clean_view(cfg), 4)
    views = [clean] + [augment(x, cfg, 4, view) for view in (1, 2)]
    logits = torch.stack([model(v) for v in views])
    expected = loss_function(cfg)(logits[0], y) + 2.0 * jensen_shannon(logits)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(clean, augment(x, Config(rotate=10), 4))  # the clean view keeps the geometry


def test_cross_entropy_on_the_cross_domain_views_is_added_to_the_clean_views():
    torch.manual_seed(0)
    model = resnet18(width=8).eval()
    x, y = (images(6) * 255).to(torch.uint8), torch.arange(6)
    cfg = Config(rotate=10, prorandconv=0.9, prorandconv_layers=2, consistency=2.0, views=3, consistency_clean=True,
                 consistency_dg_ce=True, label_smoothing=0.1)
    loss, _ = training_loss(model, x, y, cfg, 4, loss_function(cfg), "fp32")
    logits = torch.stack([model(augment(x, clean_view(cfg), 4))] + [model(augment(x, cfg, 4, v)) for v in (1, 2)])
    ce = loss_function(cfg)
    expected = ce(logits[0], y) + (ce(logits[1], y) + ce(logits[2], y)) / 2 + 2.0 * jensen_shannon(logits)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    without, _ = training_loss(model, x, y, dataclasses.replace(cfg, consistency_dg_ce=False), 4, ce, "fp32")
    assert loss - without > 0.1  # the cross-domain views' cross-entropy is really there
    with pytest.raises(UserError, match="--consistency-dg-ce has no effect without --consistency-clean"):
        Config(rotate=10, prorandconv=0.9, consistency=2.0, consistency_dg_ce=True, overrides="consistency_dg_ce")


def test_a_fixed_clean_target_keeps_the_jsd_and_moves_only_the_cross_domain_views():
    logits = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fixed = jensen_shannon(logits, fixed_first=True)
    torch.testing.assert_close(fixed, jensen_shannon(logits))
    gradient, = torch.autograd.grad(fixed, logits)
    assert torch.equal(gradient[0], torch.zeros_like(gradient[0])) and gradient[1:].abs().amin((1, 2)).gt(0).all()
    # wired into the training loss: its gradient is cross-entropy on the clean view + the JSD moving the others
    torch.manual_seed(0)
    model = resnet18(width=8).eval()
    x, y = (images(6) * 255).to(torch.uint8), torch.arange(6)
    cfg = Config(rotate=10, prorandconv=1.0, prorandconv_layers=2, consistency=2.0, consistency_clean=True,
                 consistency_fixed_clean=True)
    loss, _ = training_loss(model, x, y, cfg, 4, loss_function(cfg), "fp32")
    got = torch.autograd.grad(loss, model.fc.weight)[0]
    logits = torch.stack([model(augment(x, clean_view(cfg), 4)), model(augment(x, cfg, 4, 1))])
    for fixed_first, same in ((True, True), (False, False)):
        expected = loss_function(cfg)(logits[0], y) + 2.0 * jensen_shannon(logits, fixed_first=fixed_first)
        assert torch.allclose(got, torch.autograd.grad(expected, model.fc.weight, retain_graph=True)[0],
                              rtol=1e-4, atol=1e-5) == same


def reverse_recipe():
    """07's CONFIG with only its sizes changed (network width, epochs, batch, images): the recipe itself, not a copy."""
    spec = importlib.util.spec_from_file_location("reverse_mnist", ROOT / "07_reverse_mnist.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return dataclasses.replace(script.CONFIG, width=8, epochs=8, batch_size=32, train_subset=400, eval_subset=100,
                               amp="off")


@pytest.mark.slow  # 3 x 8 epochs of two views: 20 s on 2 idle cores of an AMD EPYC (bf16 CPU, fp32 here)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_dg_recipe_trains_above_the_majority_class_on_every_seed(data_dir, seed):
    _, data, progress = train_in_memory(dataclasses.replace(reverse_recipe(), data_dir=str(data_dir), seed=seed))
    majority = torch.bincount(data.source_val[1]).max().item() / len(data.source_val[1])
    assert progress.best_val_acc > majority + 0.25, (seed, progress.best_val_acc, majority)


def test_amplitude_perturbation_keeps_the_phase_and_each_channels_mean():
    x = images(8)
    cfg = Config(amplitude=1.0, amplitude_band=0.15, amplitude_scale=0.5)
    out = amplitude_perturbation(x, 3, cfg)
    spectrum, perturbed = torch.fft.fft2(x.double()), torch.fft.fft2(out.double())
    turned = (perturbed * spectrum.conj()).angle()  # 0 where the phase is kept: it holds the shapes
    assert turned[spectrum.abs() > 1e-6].abs().max() < 1e-4  # float32 rounding; a changed phase is O(1)
    torch.testing.assert_close(out.mean((2, 3)), x.mean((2, 3)), atol=1e-5, rtol=0)   # the DC term
    fy, fx = torch.fft.fftfreq(32).view(32, 1), torch.fft.fftfreq(32).view(1, 32)
    high = (fy ** 2 + fx ** 2).sqrt() > 0.15
    torch.testing.assert_close(perturbed.abs()[..., high], spectrum.abs()[..., high], atol=1e-4, rtol=1e-3)  # only low ones move
    assert (perturbed.abs() - spectrum.abs()).abs().amax((1, 2, 3)).min() > 0.1        # every image's do
    assert torch.equal(out, amplitude_perturbation(x, 3, cfg)) and not torch.equal(out, amplitude_perturbation(x, 4, cfg))
    assert torch.equal(amplitude_perturbation(x, 3, Config(amplitude=0.0)), x)


def test_mixstyle_with_weight_one_is_the_identity_and_zero_takes_anothers_statistics():
    mix = MixStyle(p=1.0).train()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(mix(x, weight=torch.ones(2, 1, 1, 1)), x, atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)  # randperm of 2: find a seed that swaps the pair
    while torch.equal(torch.randperm(2), torch.arange(2)):
        pass
    state = torch.get_rng_state()
    torch.manual_seed(1)
    torch.set_rng_state(state)
    other = mix(x, weight=torch.zeros(2, 1, 1, 1))
    torch.set_rng_state(state)
    permutation = torch.randperm(2)
    torch.testing.assert_close(other.mean((2, 3)), x[permutation].mean((2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(other.std((2, 3), unbiased=False), x[permutation].std((2, 3), unbiased=False),
                               atol=1e-3, rtol=1e-3)
    assert torch.equal(mix.eval()(x), x)  # eval mode: the identity
    network = resnet18(width=8, mixstyle=0.5)
    assert network.state_dict().keys() == resnet18(width=8).state_dict().keys()  # no state: models load either way


def test_ibn_instance_normalizes_its_first_half_per_image_and_batch_normalizes_the_rest():
    ibn = IBN(8, 0.5).train()
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    # Each image's own gain and shift on each channel: the IN half cannot see them, the BN half can.
    restyled = x * torch.rand(4, 8, 1, 1).add(0.5) + torch.randn(4, 8, 1, 1)
    out, out_restyled = ibn(x), ibn(restyled)
    torch.testing.assert_close(out_restyled[:, :4], out[:, :4], atol=1e-4, rtol=1e-4)
    assert (out_restyled[:, 4:] - out[:, 4:]).abs().max() > 0.1
    torch.testing.assert_close(out[:, :4].mean((2, 3)), torch.zeros(4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 4:], F.batch_norm(x[:, 4:], None, None, training=True), atol=1e-5, rtol=0)
    ibn.eval()  # no running statistics in the IN half: a test image is still normalized by its own
    torch.testing.assert_close(ibn(restyled)[:, :4], ibn(x)[:, :4], atol=1e-4, rtol=1e-4)


def test_ibn_sits_in_the_first_norm_of_every_block_of_stages_one_to_three():
    network = resnet18(width=8, ibn=0.5)
    split = [isinstance(block.bn1, IBN) for block in network.layers]
    assert split == [True] * 6 + [False] * 2
    assert not any(isinstance(block.bn2, IBN) for block in network.layers)
    assert [block.bn1.half for block in network.layers[:6]] == [4, 4, 8, 8, 16, 16]
    assert network(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    with pytest.raises(UserError, match="--ibn"):
        Config(ibn=0.5, norm="none")


def test_shared_geometry_gives_every_view_view_zeros_warp_and_colour():
    x = (images(8) * 255).to(torch.uint8)
    geometry = dict(rotate=15, shear=10, translate=0.1, crop_scale=0.25, perspective=0.15, jitter=0.3)
    shared = Config(**geometry, consistency=1.0, consistency_geometry="shared")
    assert torch.equal(augment(x, shared, 7, view=1), augment(x, shared, 7, view=0))
    assert not torch.equal(augment(x, Config(**geometry), 7, view=1), augment(x, Config(**geometry), 7, view=0))
    cross = dataclasses.replace(shared, prorandconv=1.0, prorandconv_layers=2)  # the cross-domain draws stay per view
    assert not torch.equal(augment(x, cross, 7, view=1), augment(x, cross, 7, view=2))
    assert torch.equal(augment(x, clean_view(cross), 7, view=0), augment(x, shared, 7, view=1))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the recording wrapper
def test_swa_averages_the_weights_of_its_last_steps_and_validation_scores_the_average():
    torch.manual_seed(0)
    x, y = (images(64) * 255).to(torch.uint8), torch.arange(64) % 10
    cfg = Config(width=8, epochs=2, batch_size=16, swa=0.5, amp="off")
    model = resnet18(width=8)
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, 4)
    snapshots = []
    real_step = optimizer.step

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    optimizer.step = step
    progress = fit(model, optimizer, schedule, cfg, (x, y), (x[:16], y[:16]), "fp32", Progress())
    assert int(progress.averaged["n_averaged"]) == 4  # the last half: epoch 2's four steps
    mean = torch.stack([s["fc.weight"] for s in snapshots[4:]]).mean(0)
    torch.testing.assert_close(progress.averaged["module.fc.weight"], mean)
    averaged = resnet18(width=8)
    averaged.load_state_dict({k[len("module."):]: v for k, v in progress.averaged.items() if k.startswith("module.")})
    assert progress.history[-1]["val_acc"] == evaluate(averaged, x[:16], y[:16], "fp32")[1]
    if progress.best_epoch == 2:  # the chosen epoch's weights are the average
        torch.testing.assert_close(progress.best_weights["fc.weight"], mean)
