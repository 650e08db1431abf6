"""Per-image random augmentation of a whole batch in a few tensor ops, on the batch's device.

Rotation, shear, translation, resized crop and perspective are composed into one 3x3 homography per
image and applied with a single grid_sample; colour jitter is three broadcast multiplies. No flips:
digits are not mirror-symmetric. Speed against torchvision's per-image PIL transforms: `python -m common.bench`.
"""
import functools
import math

import torch
import torch.nn.functional as F


@functools.lru_cache
def _corners(device, dtype):
    """Made once per device, not copied host -> device at every step."""
    return torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=dtype, device=device)


def _perspective(displacement):
    """Homographies (B, 3, 3) sending the corners of [-1, 1]^2 to the corners moved by `displacement` (B, 4, 2)."""
    corners = _corners(displacement.device, displacement.dtype)
    src, dst = corners.expand_as(displacement), corners + displacement
    # Two linear equations per corner in the eight unknowns of H (h33 = 1), solved for the whole batch at once.
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)
    b = torch.cat([u, v], 1)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


def augment(x, cfg, generator):
    """x: float (B, 3, H, W) in [0, 1]. Strengths come from cfg (rotate, shear, translate, crop_scale,
    perspective, jitter, invert); each image draws its own parameters from `generator` (on x's device)."""
    b, device = x.shape[0], x.device
    u = torch.rand(b, 16, generator=generator, device=device, dtype=torch.float32) * 2 - 1  # U(-1, 1)

    angle = u[:, 0] * math.radians(cfg.rotate)
    shear = u[:, 1] * math.radians(cfg.shear)
    area = 1 - cfg.crop_scale * (u[:, 2] + 1) / 2
    aspect = torch.exp(u[:, 3] * math.log(4 / 3) * (cfg.crop_scale > 0))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    # The crop window stays inside the image; translation then shifts it by up to `translate` of the size.
    tx = u[:, 4] * (1 - sx) + u[:, 5] * 2 * cfg.translate
    ty = u[:, 6] * (1 - sy) + u[:, 7] * 2 * cfg.translate
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    # Output pixel -> input pixel: crop scale . rotation . x-shear, then the shift.
    affine = torch.stack([
        torch.stack([sx * cos, sx * (cos * tan - sin), tx], -1),
        torch.stack([sy * sin, sy * (sin * tan + cos), ty], -1),
        torch.stack([zero, zero, one], -1)], 1)
    homography = affine @ _perspective(u[:, 8:16].view(b, 4, 2) * 2 * cfg.perspective)

    h, w = x.shape[-2:]
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1  # pixel centres, align_corners=False
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    gx, gy = xs.view(1, 1, w), ys.view(1, h, 1)
    # Broadcast multiply-adds, not a batched matmul of (H*W x 3) @ (3 x 3): 8 ms -> under 1 ms for 512 images.
    hm = homography.view(b, 9, 1, 1).unbind(1)
    z = (hm[6] * gx + hm[8]) + hm[7] * gy  # (b, 1, w) + (b, h, 1): only the last add is full-size
    grid = torch.stack([(hm[0] * gx + hm[2]) + hm[1] * gy, (hm[3] * gx + hm[5]) + hm[4] * gy], -1).div_(z.unsqueeze(-1))
    # Border fill: SVHN crops continue past their edges, so a black frame would be a tell-tale artefact.
    x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    if cfg.jitter > 0:
        factors = 1 + torch.rand(b, 3, 1, 1, 1, generator=generator, device=device).mul(2).sub(1) * cfg.jitter
        brightness, contrast, saturation = factors.unbind(1)
        # Brightness, then contrast about the mean grey, then saturation about each pixel's grey are all
        # affine per image, so they fold into one pass: alpha * (s * x + (1 - s) * grey) + beta.
        grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
        alpha = brightness * contrast
        beta = brightness * grey.mean((2, 3), keepdim=True) * (1 - contrast)
        x = torch.addcmul(grey * (alpha * (1 - saturation)) + beta, x, alpha * saturation)  # one full-size pass
    x = x.clamp_(0, 1)
    if cfg.invert > 0:
        flip = torch.rand(b, 1, 1, 1, generator=generator, device=device) < cfg.invert
        x = torch.where(flip, 1 - x, x)
    return x
