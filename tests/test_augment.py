import dataclasses

import torch

from common import Config
from common.augment import _perspective, augment

STRONG = Config(rotate=20, shear=10, translate=0.1, crop_scale=0.3, perspective=0.2, jitter=0.4)


def batch():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_shape_dtype_range():
    out = augment(batch(), STRONG, torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_identity_when_strengths_are_zero():
    x = batch()
    assert torch.allclose(augment(x, Config(), torch.Generator().manual_seed(1)), x / 255, atol=1e-5)


def test_perspective_sends_each_corner_to_its_displaced_corner():
    displacement = torch.rand(5, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.6 - 0.3
    corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]])
    mapped = _perspective(displacement) @ torch.cat([corners, torch.ones(4, 1)], 1).T  # (5, 3, 4)
    assert torch.allclose((mapped[:, :2] / mapped[:, 2:]).transpose(1, 2), corners + displacement, atol=1e-5)


def test_each_image_gets_its_own_transform():
    x = batch()[:1].expand(4, -1, -1, -1).contiguous()  # four copies of one image
    out = augment(x, STRONG, torch.Generator().manual_seed(1))
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    for field in ("rotate", "perspective", "jitter"):  # each strength alone also varies per image
        only = dataclasses.replace(Config(), **{field: getattr(STRONG, field)})
        single = augment(x, only, torch.Generator().manual_seed(2))
        assert not torch.allclose(single[0], single[1], atol=1e-3), field


def test_fixed_seed_reproduces_the_batch():
    x = batch()
    a = augment(x, STRONG, torch.Generator().manual_seed(3))
    b = augment(x, STRONG, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, STRONG, torch.Generator().manual_seed(4)))


def test_invert_flips_polarity_per_image():
    x = batch()
    assert torch.allclose(augment(x, Config(invert=0.99999), torch.Generator().manual_seed(1)), 1 - x / 255, atol=1e-5)
    half = augment(x[:1].expand(64, -1, -1, -1), Config(invert=0.5), torch.Generator().manual_seed(1))
    flipped = [torch.allclose(img, 1 - x[0] / 255, atol=1e-5) for img in half]
    assert 10 < sum(flipped) < 54  # each image draws its own coin
