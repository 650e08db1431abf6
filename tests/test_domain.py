"""Cross-domain building blocks: random-convolution augmentation and test-time adaptation."""
import dataclasses
import json

import pytest
import torch

from common import Config, UserError, run
from common.augment import augment, random_convolution
from common.models import resnet18
from common.tta import adapt_batchnorm, adapted_accuracy, tent


def images(n=8):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_randconv_is_per_image_seeded_and_keeps_shapes():
    x = images(1).expand(6, -1, -1, -1).contiguous()  # six copies of one image
    out = random_convolution(x, key=3, probability=0.999)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # each image its own kernel and mixing weight
    assert torch.equal(out, random_convolution(x, key=3, probability=0.999))
    assert not torch.equal(out, random_convolution(x, key=4, probability=0.999))


def test_randconv_probability_keeps_some_images_clean():
    x = images(64)
    out = random_convolution(x, key=1, probability=0.5)
    clean = [torch.equal(a, b) for a, b in zip(out, x)]
    assert 10 < sum(clean) < 54
    assert torch.equal(augment((x * 255).to(torch.uint8), Config(), 1),
                       augment((x * 255).to(torch.uint8), Config(randconv=0.0), 1))


def test_randconv_in_training_keeps_labels(data_dir, tmp_path):
    cfg = Config(width=8, epochs=1, train_subset=64, eval_subset=32, randconv=0.5, data_dir=str(data_dir),
                 results_dir=str(tmp_path))
    run(cfg)
    metrics = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())
    assert metrics["config"]["randconv"] == 0.5 and (tmp_path / "01_base/seed-0/augmented.png").exists()
    # The target dev set: the cross-domain training file, which an SVHN run never trains on.
    assert set(metrics["dev"]) == {"mnist"} and metrics["data"]["dev_mnist"] == 32 and 0 <= metrics["dev"]["mnist"] <= 1


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


def test_tent_adapts_only_a_copy_and_predicts_every_image():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = (images(40) * 255).to(torch.uint8)
    preds = tent(model, target, "fp32")
    assert preds.shape == (40,) and preds.dtype == torch.int64
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert 0 <= adapted_accuracy(model, target, torch.zeros(40, dtype=torch.long), "tent", "fp32") <= 1


def test_tta_is_reported_beside_the_source_only_number(data_dir, tmp_path):
    base = Config(width=8, epochs=1, train_subset=64, eval_subset=32, data_dir=str(data_dir), results_dir=str(tmp_path))
    run(base)
    source_only = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())
    for method in ("bn", "tent"):
        run(dataclasses.replace(base, tta=method, restart=True))
        metrics = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())
        assert metrics["test"] == source_only["test"]  # TTA never changes the source-only numbers
        assert set(metrics["test_tta"]) == {"mnist"} and 0 <= metrics["test_tta"]["mnist"] <= 1
    from common.report import summary
    assert "## Test-time adaptation" in summary(tmp_path)


def test_tta_needs_batchnorm():
    with pytest.raises(UserError, match="--norm none"):
        adapted_accuracy(resnet18(width=8, norm="none"), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                         torch.zeros(4, dtype=torch.long), "bn", "fp32")
