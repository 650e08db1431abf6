import dataclasses
import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from common import Config
import common.augment
from common.augment import _perspective, augment, colour, draw, homographies, warp

STRONG = Config(rotate=20, shear=10, translate=0.1, crop_scale=0.3, perspective=0.2, jitter=0.4)


def batch():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_shape_dtype_range():
    out = augment(batch(), STRONG, 1)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_identity_when_strengths_are_zero():
    x = batch()
    assert torch.allclose(augment(x, Config(), 1), x / 255, atol=1e-5)


def test_perspective_sends_each_corner_to_its_displaced_corner():
    displacement = torch.rand(5, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.6 - 0.3
    corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]])
    mapped = _perspective(displacement) @ torch.cat([corners, torch.ones(4, 1)], 1).T  # (5, 3, 4)
    assert torch.allclose((mapped[:, :2] / mapped[:, 2:]).transpose(1, 2), corners + displacement, atol=1e-5)


def test_each_image_gets_its_own_transform():
    x = batch()[:1].expand(4, -1, -1, -1).contiguous()  # four copies of one image
    out = augment(x, STRONG, 1)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    for field in ("rotate", "perspective", "jitter"):  # each strength alone also varies per image
        only = dataclasses.replace(Config(), **{field: getattr(STRONG, field)})
        single = augment(x, only, 2)
        assert not torch.allclose(single[0], single[1], atol=1e-3), field


def test_fixed_key_reproduces_the_batch():
    x = batch()
    assert torch.equal(augment(x, STRONG, 3), augment(x, STRONG, 3))
    assert not torch.equal(augment(x, STRONG, 3), augment(x, STRONG, 4))


def test_invert_flips_polarity_per_image():
    x = batch()
    assert torch.allclose(augment(x, Config(invert=1.0), 1), 1 - x / 255, atol=1e-5)
    half = augment(x[:1].expand(64, -1, -1, -1), Config(invert=0.5), 1)
    flipped = [torch.allclose(img, 1 - x[0] / 255, atol=1e-5) for img in half]
    assert 10 < sum(flipped) < 54  # each image draws its own coin


def test_adding_an_augmentation_keeps_the_draws_of_the_others(monkeypatch):
    x = batch()
    geometry = augment(x, Config(rotate=20, perspective=0.2), 5)
    # Inversion switched on: same rotations and perspectives, every image inverted.
    assert torch.allclose(augment(x, Config(rotate=20, perspective=0.2, invert=1.0), 5), 1 - geometry, atol=1e-5)
    # Jitter and shear switched on: the rotation draws the same angles from its own stream.
    drawn = []
    record = lambda key, name, columns, b, device: drawn.append((name, draw(key, name, columns, b, device))) or drawn[-1][1]
    monkeypatch.setattr(common.augment, "draw", record)
    augment(x, Config(rotate=20), 5)
    alone = dict(drawn)
    drawn.clear()
    augment(x, Config(rotate=20, shear=10, jitter=0.3), 5)
    both = dict(drawn)
    assert set(alone) == {"rotate"} and set(both) == {"rotate", "shear", "jitter"}
    assert torch.equal(alone["rotate"], both["rotate"]) and not torch.equal(both["rotate"], both["shear"])


def smooth_image():
    """A smooth image, so that border handling aside bilinear resampling is compared on interior pixels."""
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    return torch.nn.functional.avg_pool2d(noise, 5, 1, 2).round().to(torch.uint8)


def ours(image, angle=0.0, shear=0.0, scale=1.0, tx=0.0, ty=0.0):
    t = lambda v: torch.tensor([float(v)])
    return warp(image, homographies(t(math.radians(angle)), t(math.radians(shear)), t(scale), t(scale), t(tx), t(ty)))[0]


@pytest.mark.parametrize("ours_kwargs, theirs_kwargs", [
    (dict(angle=12), dict(angle=-12)),                                # our rotation angle is torchvision's negated
    (dict(shear=9), dict(shear=[9.0, 0.0])),                          # x-shear
    (dict(scale=0.8), dict(scale=1 / 0.8)),                           # ours maps output -> input: zoom in by 1/scale
    (dict(tx=0.125, ty=-0.25), dict(translate=[-2.0, 4.0])),          # [-1, 1] units: 0.125 of 32/2 px, opposite sign
])
def test_geometry_matches_torchvision_v2_on_the_same_parameters(ours_kwargs, theirs_kwargs):
    image = smooth_image()
    theirs = TF.affine(image[0].float(), **{**dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0]),
                                            **theirs_kwargs}, interpolation=InterpolationMode.BILINEAR)
    interior = (slice(None), slice(8, 24), slice(8, 24))
    assert torch.allclose(ours(image, **ours_kwargs)[interior], theirs[interior], atol=1e-3)


def test_perspective_matches_torchvision_v2():
    image = smooth_image()
    displacement = torch.tensor([[[0.1, -0.05], [-0.08, 0.12], [0.05, 0.05], [-0.1, -0.02]]])
    corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]])
    pixels = lambda points: ((points + 1) * 16).tolist()
    theirs = TF.perspective(image[0].float(), startpoints=pixels(corners + displacement[0]), endpoints=pixels(corners),
                            interpolation=InterpolationMode.BILINEAR)
    interior = (slice(None), slice(8, 24), slice(8, 24))
    assert torch.allclose(warp(image, _perspective(displacement))[0][interior], theirs[interior], atol=1e-3)


def test_colour_jitter_matches_torchvision_v2_in_order():
    x = smooth_image().float() * 0.4 + 60  # mid-range: no intermediate value clips, where torchvision would clamp
    b, c, s = 1.2, 0.8, 1.3
    theirs = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x / 255, b), c), s)
    ours_ = colour(x, torch.tensor([b]), torch.tensor([c]), torch.tensor([s]))
    assert torch.allclose(ours_, theirs, atol=1e-4)  # grey weights 0.299 vs torchvision's 0.2989
