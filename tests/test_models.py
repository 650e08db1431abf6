import pytest
import torch
import torch.nn as nn

from common import Config, UserError
from common.models import BasicBlock, build_model, imagenet_resnet18, resnet18


def test_resnet18_output_shape_and_parameter_count():
    model = resnet18()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # ResNet-18, 32x32 stem, 10 classes
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 8


def test_no_bn_variant_has_no_batchnorm_and_starts_as_identity_blocks():
    model = resnet18(norm="none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    block = model.layers[0]
    x = torch.rand(1, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(x))  # zero gain: the residual branch is off at init


def test_build_model_normalizes_inputs():
    model = build_model(Config(width=8), mean=[0.5] * 3, std=[0.25] * 3)
    assert torch.allclose(model[0](torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("transfer_input, size", [("upsample64", 64), ("stem3x3", 32)])
def test_imagenet_adapter_shapes(transfer_input, size):
    front, net = imagenet_resnet18(transfer_input, pretrained=False)
    x = torch.rand(2, 3, 32, 32)
    for layer in front:
        x = layer(x)
    assert x.shape[-1] == size and net(x).shape == (2, 10)


def test_imagenet_weights_load_from_torchvision_cache(tmp_path, monkeypatch):
    import torchvision
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="resnet18-f37072fd.pth.*--weights PATH"):
        imagenet_resnet18()
    reference = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    _, net = imagenet_resnet18("upsample64")
    assert torch.equal(net.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert net.fc.out_features == 10


def test_per_image_standardization_ignores_brightness_and_contrast():
    model = build_model(Config(width=8, input_norm="image"), mean=[0.5] * 3, std=[0.25] * 3)
    x = torch.rand(2, 3, 32, 32)
    out = model[0](x)
    assert torch.allclose(out.mean((1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(out.std((1, 2, 3)), torch.ones(2), atol=1e-4)
    assert torch.allclose(model[0](0.5 * x + 0.2), out, atol=1e-4)


def test_edges_input_is_the_same_for_a_digit_in_any_colour_or_polarity():
    from common.models import Edges
    digit = torch.zeros(1, 1, 32, 32)
    digit[..., 6:26, 13:19] = 1.0
    light_on_dark = digit.expand(-1, 3, -1, -1)
    coloured = 0.2 + 0.5 * (1 - digit) * torch.tensor([0.9, 0.3, 0.6]).view(1, 3, 1, 1)  # dark ink, a tinted ground
    edges = Edges()
    a, b = edges(light_on_dark), edges(coloured)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # outlines only: no colour, no polarity
    assert a[0, :, 16, 13].min() > a[0, :, 16, 3].max() and torch.equal(a[:, 0], a[:, 1])  # the stroke's edge stands out
    model = build_model(Config(input_norm="edges", width=8), [0.5] * 3, [0.2] * 3)
    assert model(light_on_dark).shape == (1, 10) and "0.kernels" not in model.state_dict()  # nothing new to save
