"""Per-image random augmentation of a whole batch in a few tensor ops, on the batch's device.

Rotation, shear, translation, resized crop and perspective are composed into one 3x3 homography per
image and applied with a single grid_sample; colour jitter, the uint8 -> [0, 1] scaling and the random
inversion are all affine per image, so they fold into one more full-size pass. No flips: digits are not
mirror-symmetric. Speed against torchvision's per-image PIL transforms: `python -m common.bench`.
"""
import functools
import math

import torch
import torch.nn.functional as F


@functools.lru_cache
def _constants(device):
    """Made once per device, not copied host -> device at every step."""
    corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]], device=device)
    # Rows give the three corner combinations of Heckbert's square-to-quad formula (see _perspective).
    combos = torch.tensor([[0., 1., -1., 0.], [0., 0., -1., 1.], [1., -1., 1., -1.]], device=device)
    grey = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
    return corners, combos, grey


def _perspective(displacement):
    """Homographies (B, 3, 3), up to scale, sending the corners (-1,-1), (1,-1), (1,1), (-1,1) of [-1, 1]^2 to
    those corners moved by `displacement` (B, 4, 2). Closed form (Heckbert 1989, square to quadrilateral):
    a 2x2 Cramer solve per image instead of a batched 8x8 torch.linalg.solve (same matrices within 3e-7),
    0.25 -> 0.07 ms for 512 images."""
    corners, combos, _ = _constants(displacement.device)
    q = corners + displacement
    (dx1, dx2, dx3), (dy1, dy2, dy3) = (combos @ q).permute(2, 1, 0)  # each (B,)
    det = dx1 * dy2 - dx2 * dy1
    g, h = (dx3 * dy2 - dx2 * dy3) / det, (dx1 * dy3 - dx3 * dy1) / det
    q = F.pad(q, (0, 1), value=1.0)  # homogeneous corners (B, 4, 3)
    # Unit square -> quad has columns q1 (1+g) - q0, q3 (1+h) - q0, q0; composing with [-1,1]^2 -> unit square
    # (s -> (s+1)/2) and scaling by 2 gives columns c0, c1, c0 + c1 + 2 q0.
    c0 = q[:, 1] * (1 + g).unsqueeze(1) - q[:, 0]
    c1 = q[:, 3] * (1 + h).unsqueeze(1) - q[:, 0]
    return torch.stack([c0, c1, c0 + c1 + 2 * q[:, 0]], 2)


def augment(images, cfg, generator):
    """images: uint8 (B, 3, H, W) -> float in [0, 1]. Strengths come from cfg (rotate, shear, translate,
    crop_scale, perspective, jitter, invert); each image draws its own parameters from `generator` (on the
    images' device)."""
    b, device = images.shape[0], images.device
    u = torch.rand(b, 20, generator=generator, device=device) * 2 - 1  # U(-1, 1)

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
    if cfg.perspective > 0:
        affine = affine @ _perspective(u[:, 8:16].view(b, 4, 2) * 2 * cfg.perspective)

    h, w = images.shape[-2:]
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1  # pixel centres, align_corners=False
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    gx, gy = xs.view(1, 1, w), ys.view(1, h, 1)
    # Broadcast multiply-adds, not a batched matmul of (H*W x 3) @ (3 x 3): 8 ms -> under 1 ms for 512 images.
    hm = affine.view(b, 9, 1, 1).unbind(1)
    z = (hm[6] * gx + hm[8]) + hm[7] * gy  # (b, 1, w) + (b, h, 1): only the last add is full-size
    grid = torch.stack([(hm[0] * gx + hm[2]) + hm[1] * gy, (hm[3] * gx + hm[5]) + hm[4] * gy], -1).div_(z.unsqueeze(-1))
    # Bilinear sampling is linear in the pixel values, so it runs on 0..255 and the 1/255 joins the colour pass.
    # Border fill: SVHN crops continue past their edges, so a black frame would be a tell-tale artefact.
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    # One affine pass per image: out = gain * x + offset, clamped. Brightness, then contrast about the mean
    # grey, then saturation about each pixel's grey: alpha * (s * x + (1 - s) * grey) + beta.
    gain = torch.full((b, 1, 1, 1), 1 / 255, device=device)
    offset = torch.zeros((b, 1, 1, 1), device=device)
    if cfg.jitter > 0:
        brightness, contrast, saturation = (1 + u[:, 16:19] * cfg.jitter).view(b, 3, 1, 1, 1).unbind(1)
        grey = (x * _constants(device)[2]).sum(1, keepdim=True)
        alpha = brightness * contrast / 255
        beta = brightness * grey.mean((2, 3), keepdim=True) * (1 - contrast) / 255
        gain, offset = alpha * saturation, torch.addcmul(beta, grey, alpha * (1 - saturation))
    if cfg.invert > 0:  # 1 - clamp(y, 0, 1) = clamp(1 - y, 0, 1): inversion folds into the same pass
        flip = (u[:, 19] + 1 < 2 * cfg.invert).view(b, 1, 1, 1)
        sign = 1 - 2 * flip.float()
        gain, offset = gain * sign, offset * sign + flip
    return torch.addcmul(offset, x, gain).clamp_(0, 1)
