"""Cross-domain building blocks: random-convolution augmentation and test-time adaptation."""
import copy
import dataclasses
import json
import math

import pytest
import torch

from common import Config, UserError, run
from torchvision.ops import deform_conv2d

from common.augment import (augment, deformable_convolution, deformable_taps, progressive_random_convolution,
                            random_convolution)
from common.models import build_model, resnet18
from common.training import jensen_shannon, loss_function, training_loss
from common.training import evaluate
from common.tta import adapt_batchnorm, adapted_accuracy, entropy, information_maximization, shot, t3a, tent

TENT_BATCH = 128  # tent()'s default batch


PRO4 = Config(prorandconv=0.999, prorandconv_layers=4)


def images(n=8):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_randconv_is_per_image_seeded_and_keeps_shapes():
    x = images(1).expand(6, -1, -1, -1).contiguous()  # six copies of one image
    out = random_convolution(x, 3, Config(randconv=0.999))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # each image its own kernel and mixing weight
    assert torch.equal(out, random_convolution(x, 3, Config(randconv=0.999)))
    assert not torch.equal(out, random_convolution(x, 4, Config(randconv=0.999)))


def test_randconv_probability_keeps_some_images_clean():
    x = images(64)
    out = random_convolution(x, 1, Config(randconv=0.5))
    clean = [torch.equal(a, b) for a, b in zip(out, x)]
    assert 10 < sum(clean) < 54
    assert torch.equal(augment((x * 255).to(torch.uint8), Config(), 1),
                       augment((x * 255).to(torch.uint8), Config(randconv=0.0), 1))


def test_a_randconv_run_still_learns_its_labels_and_records_dev(data_dir, tmp_path):
    cfg = Config(width=8, epochs=4, train_subset=256, eval_subset=64, batch_size=32, randconv=0.5, amp="off",
                 data_dir=str(data_dir), results_dir=str(tmp_path))
    run(cfg)
    metrics = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())
    assert metrics["config"]["randconv"] == 0.5 and (tmp_path / "01_base/seed-0/augmented.png").exists()
    assert metrics["best_val_acc"] > 0.3 and metrics["test"]["svhn"] > 0.3  # chance is 0.1: labels survived
    # Dev sets: other domains' training files (here only MNIST is present), never trained on.
    assert set(metrics["dev"]) == {"mnist"} and metrics["data"]["dev_mnist"] == 64
    assert metrics["selection"]["recipe"] == ["mnist"] and set(metrics["skipped_domains"]) == {"mnistm", "usps"}


def test_progressive_randconv_is_per_image_seeded_and_keeps_shapes():
    x = images(1).expand(6, -1, -1, -1).contiguous()
    out = progressive_random_convolution(x, 3, PRO4)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    assert torch.equal(out, progressive_random_convolution(x, 3, PRO4))
    assert not torch.equal(out, progressive_random_convolution(x, 4, PRO4))
    half = progressive_random_convolution(images(64), 1, Config(prorandconv=0.5, prorandconv_layers=2))
    assert 10 < sum(torch.equal(a, b) for a, b in zip(half, images(64))) < 54  # some images stay clean


def test_deformable_convolution_matches_torchvision_deform_conv2d():
    g = torch.Generator().manual_seed(0)
    x, offsets, weights = (torch.randn(*shape, generator=g) for shape in ((3, 3, 9, 7), (3, 18, 9, 7), (3, 3, 3, 3, 3)))
    ours = deformable_convolution(x, deformable_taps(offsets * 0.7, 9, 7), weights, padding="zeros")
    theirs = torch.cat([deform_conv2d(x[i:i + 1], offsets[i:i + 1] * 0.7, weights[i], padding=1) for i in range(3)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_views_have_their_own_draws_and_view_zero_is_the_plain_augmentation():
    x = (images(16) * 255).to(torch.uint8)
    cfg = Config(rotate=15, jitter=0.3, prorandconv=0.5, prorandconv_layers=3)
    assert torch.equal(augment(x, cfg, 5), augment(x, cfg, 5, view=0))
    assert not torch.allclose(augment(x, cfg, 5, view=0), augment(x, cfg, 5, view=1))
    assert torch.equal(augment(x, cfg, 5, view=1), augment(x, cfg, 5, view=1))


def test_jensen_shannon_is_zero_for_identical_views_and_positive_otherwise():
    logits = torch.randn(1, 8, 10, generator=torch.Generator().manual_seed(0))
    assert jensen_shannon(logits.expand(3, -1, -1)).abs() < 1e-6
    different = torch.randn(3, 8, 10, generator=torch.Generator().manual_seed(1))
    assert 0 < jensen_shannon(different) <= torch.log(torch.tensor(3.))
    # Two views certain of different classes: the bound ln 2.
    confident = torch.full((2, 1, 10), -1e4)
    confident[0, 0, 0] = confident[1, 0, 1] = 0
    torch.testing.assert_close(jensen_shannon(confident), torch.log(torch.tensor(2.)))


def test_consistency_loss_is_cross_entropy_of_every_view_plus_weighted_divergence():
    torch.manual_seed(0)
    model = resnet18(width=8).train()
    x, y = (images(6) * 255).to(torch.uint8), torch.arange(6)
    cfg = Config(rotate=15, prorandconv=0.5, prorandconv_layers=2, consistency=0.7, views=3, label_smoothing=0.1)
    loss, first = training_loss(model, x, y, cfg, 11, loss_function(cfg), "fp32")
    inputs = torch.cat([augment(x, cfg, 11, view) for view in range(3)]).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    logits = resnet18(width=8).train()(inputs).view(3, 6, 10)  # a fresh copy: same weights, same BN state
    expected = loss_function(cfg)(logits.flatten(0, 1), y.repeat(3)) + 0.7 * jensen_shannon(logits)
    torch.testing.assert_close(loss, expected)
    assert first.shape == (6, 10) and torch.allclose(first, logits[0])
    single = dataclasses.replace(cfg, consistency=0.0)  # off: one view, plain cross-entropy, no extra forward
    loss, _ = training_loss(model, x, y, single, 11, loss_function(single), "fp32")
    torch.testing.assert_close(loss, loss_function(single)(model(augment(x, single, 11)), y), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 27 steps of two views: the loss definition is the fast test above
def test_consistency_training_learns(data_dir, tmp_path):
    cfg = Config(width=8, epochs=3, train_subset=320, eval_subset=32, batch_size=32, jitter=0.3, prorandconv=0.3,
                 prorandconv_layers=2, consistency=1.0, data_dir=str(data_dir), results_dir=str(tmp_path))
    run(cfg)
    metrics = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())
    losses = metrics["steps"]
    assert len(losses) == 27 and sum(losses[-5:]) < 0.8 * sum(losses[:5])


def bn_model():
    torch.manual_seed(0)
    model = resnet18(width=8)
    with torch.no_grad():  # some training-like statistics, so that re-estimating them changes something
        model.train()
        model(images(32))
    return model.eval()


def test_bn_adaptation_changes_bn_buffers_only_and_on_a_copy():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = (images(64) * 128 + 100).to(torch.uint8)  # another "domain": brighter, lower contrast
    adapted = adapt_batchnorm(model, target, "fp32")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the source model untouched
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                           for k in changed)
    # The statistics are the target's: the stem's BN holds the mean and variance of its conv over the target.
    with torch.no_grad():
        features = model.stem[0](target.float() / 255)
    torch.testing.assert_close(adapted.stem[1].running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapted.stem[1].running_var, features.var((0, 2, 3)), rtol=1e-3, atol=1e-5)


def shifted(split):
    """The same images through another "camera": dimmer contrast, brighter."""
    x, y = split
    return (x.float() * 0.4 + 140).round().to(torch.uint8), y


def test_bn_adaptation_recovers_most_of_the_accuracy_lost_on_a_shifted_domain(trained):
    model, (x, y) = trained.model, trained.data.test_sets["svhn"]
    target, _ = shifted((x, y))
    clean, before = evaluate(model, x, y, "fp32")[1], evaluate(model, target, y, "fp32")[1]
    after = adapted_accuracy(model, target, y, "bn", "fp32", trained.cfg)
    assert clean > 0.5 and before < clean - 0.2, (clean, before)  # the shift hurts
    assert after - before > 0.5 * (clean - before), (clean, before, after)  # adaptation wins most of it back


def test_tent_steps_lower_the_entropy_of_the_stream_and_touch_only_bn_affine_parameters(trained):
    target, _ = shifted(trained.data.test_sets["svhn"])
    _, frozen = tent(trained.model, target, "fp32", lr=0.0, batch_size=32)
    _, adapted = tent(trained.model, target, "fp32", lr=0.05, batch_size=32)
    frozen_params = dict(frozen.named_parameters())
    changed = {k for k, v in adapted.named_parameters() if not torch.equal(v, frozen_params[k])}
    bn_affine = {f"{name}.{p}" for name, m in adapted.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 for p in ("weight", "bias")}
    assert changed and changed <= bn_affine, changed
    with torch.no_grad():  # BN on the batch's statistics, as Tent predicts
        batch = target[:64].float() / 255
        before, after = (entropy(m.train()(batch)).mean() for m in (frozen, adapted))
    assert after < before


def test_information_maximization_prefers_confident_and_diverse_predictions():
    confident = torch.full((10, 10), -20.0)
    collapsed = confident.clone()
    confident[range(10), range(10)] = 20.0   # each image a different class, certain
    collapsed[:, 3] = 20.0                   # every image class 3, certain
    uncertain = torch.zeros(10, 10)
    loss = {k: information_maximization(v).item() for k, v in
            dict(diverse=confident, collapsed=collapsed, uncertain=uncertain).items()}
    assert loss["diverse"] == pytest.approx(-math.log(10), abs=1e-3)  # entropy 0, diversity ln 10
    assert loss["collapsed"] == pytest.approx(0.0, abs=1e-3)           # what Tent's entropy alone cannot tell apart
    assert loss["uncertain"] == pytest.approx(0.0, abs=1e-3)


def test_shot_adapts_a_copy_and_cannot_collapse_onto_a_few_classes(trained):
    model = trained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target, y = shifted(trained.data.test_sets["svhn"])
    adapted = shot(model, target, "fp32", lr=0.05, batch_size=32)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = {k.rsplit(".", 1)[1] for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert {"weight", "bias", "running_mean"} <= changed  # BN statistics, then its affine parameters
    predictions = evaluate(adapted, target, y, "fp32")[2]
    assert len(predictions.unique()) >= 8  # a balanced stream keeps (nearly) every class
    assert adapted_accuracy(model, target, y, "shot", "fp32", dataclasses.replace(trained.cfg, shot_lr=0.05)) > 0.3


def test_t3a_predicts_online_with_prototypes_and_changes_nothing(trained):
    model = trained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = trained.data.test_sets["svhn"]
    predictions = t3a(model, x, "fp32", filter_k=20, batch_size=32)
    assert predictions.shape == y.shape and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    source_only = evaluate(model, x, y, "fp32")[1]
    assert (predictions == y).float().mean() > source_only - 0.1  # prototypes refine the classifier, not replace it


def test_t3a_moves_each_prototype_towards_the_features_of_its_predicted_class():
    """2-D features read off two pixels; the classifier's rows point at 0 and 90 degrees. The target's class 0
    lies at 40 degrees and class 1 at 80: after them, an image at 50 degrees (the classifier's class 1) is
    nearest to class 0's prototype."""
    projection, fc = torch.nn.Linear(3 * 32 * 32, 2, bias=False), torch.nn.Linear(2, 2)
    with torch.no_grad():
        projection.weight.zero_()
        projection.weight[0, 0] = projection.weight[1, 1] = 1.0  # channel 0, row 0: pixels 0 and 1
        fc.weight.copy_(torch.eye(2))
        fc.bias.zero_()
    model = torch.nn.Sequential(torch.nn.Flatten(), projection, fc)

    def at(degrees, n):
        x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = round(255 * math.cos(math.radians(degrees))), round(255 * math.sin(math.radians(degrees)))
        return x
    stream = torch.cat([at(40, 20), at(80, 20), at(50, 1)])
    assert model(stream[-1:].float() / 255).argmax().item() == 1  # the classifier alone
    predictions = t3a(model, stream, "fp32", filter_k=100, batch_size=40)
    assert predictions[:20].eq(0).all() and predictions[20:40].eq(1).all() and predictions[-1].item() == 0


def test_tent_adapts_only_a_copy_and_predicts_every_image_online():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = (images(300) * 255).to(torch.uint8)
    preds, _ = tent(model, target, "fp32")
    assert preds.shape == (300,) and preds.dtype == torch.int64
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # Online: the first batch is predicted before any update, with BatchNorm on the batch's own statistics.
    with torch.no_grad():
        first = copy.deepcopy(model).train()(target[:TENT_BATCH].float() / 255).argmax(1)
    assert torch.equal(preds[:TENT_BATCH], first)
    assert adapted_accuracy(model, target, preds, "tent", "fp32", Config()) == 1.0  # scored against these very predictions


def test_tta_adapts_to_each_target_and_dev_domain_beside_its_source_only_number(all_domains_dir, tmp_path):
    base = Config(width=8, epochs=1, train_subset=64, eval_subset=32, data_dir=str(all_domains_dir),
                  results_dir=str(tmp_path), tta="bn,tent,shot,t3a")
    run(base)
    metrics = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())
    assert set(metrics["test"]) == {"svhn", "mnist", "mnistm", "usps"}
    assert set(metrics["test_tta"]) == set(metrics["dev_tta"]) == {"bn", "tent", "shot", "t3a"}
    model = build_model(base, [0.0] * 3, [1.0] * 3, pretrained=False)
    model.load_state_dict(torch.load(tmp_path / "01_base/seed-0/model.pt", weights_only=True)["model"])
    from common.data import load
    from common.data import capped
    for method in ("bn", "tent", "shot", "t3a"):
        assert set(metrics["test_tta"][method]) == {"mnist", "mnistm", "usps"}  # every target, not the source
        assert set(metrics["dev_tta"][method]) == set(metrics["dev"]) == {"mnist", "mnistm", "usps"}
        x, y = capped(load("usps", "test", all_domains_dir), 32, "cpu")
        alone = adapted_accuracy(model.eval(), x, y, method, "fp32", base)  # each alone = all at once
        assert alone == metrics["test_tta"][method]["usps"], method
    from common.report import summary
    dev_section, test_section = summary(tmp_path).split("## Test-time adaptation (a separate")
    assert "| 01_base | 0 | shot | USPS |" in dev_section.split("## Test-time adaptation on the dev sets")[1]
    rows = [line for line in test_section.splitlines() if line.startswith("| 01_base | 0 | bn |")]
    assert [r.split("|")[4].strip() for r in rows] == ["MNIST", "MNIST-M", "USPS"]
    assert rows[0].split("|")[5].strip() == f"{100 * metrics['test']['mnist']:.2f}"
    assert rows[0].split("|")[6].strip() == f"{100 * metrics['test_tta']['bn']['mnist']:.2f}"


def test_tta_needs_batchnorm():
    with pytest.raises(UserError, match="--norm none"):
        adapted_accuracy(resnet18(width=8, norm="none"), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                         torch.zeros(4, dtype=torch.long), "bn", "fp32", Config())
