"""Per-image random augmentation of a whole batch in a few tensor ops, on the batch's device.

Rotation, shear, translation, resized crop and perspective are composed into one 3x3 homography per
image and applied with a single grid_sample; colour jitter is three broadcast multiplies. No flips:
digits are not mirror-symmetric. Speed against torchvision's per-image PIL transforms: `python -m common.bench`.
"""
import math

import torch
import torch.nn.functional as F


def _perspective(displacement):
    """Homographies (B, 3, 3) sending the corners of [-1, 1]^2 to the corners moved by `displacement` (B, 4, 2)."""
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=displacement.dtype, device=displacement.device)
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
    perspective, jitter); each image draws its own parameters from `generator` (on x's device)."""
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
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)
    mapped = points @ homography.transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:]).view(b, h, w, 2)
    # Border fill: SVHN crops continue past their edges, so a black frame would be a tell-tale artefact.
    x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    if cfg.jitter > 0:
        factors = 1 + torch.rand(b, 3, 1, 1, 1, generator=generator, device=device).mul(2).sub(1) * cfg.jitter
        brightness, contrast, saturation = factors.unbind(1)
        luma = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
        x = x * brightness
        mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = (x * luma).sum(1, keepdim=True)
        x = grey + (x - grey) * saturation
    return x.clamp(0, 1)
