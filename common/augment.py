"""Per-image random augmentation of a whole batch in a few tensor ops, on the batch's device.

Rotation, shear, translation, resized crop and perspective are composed into one 3x3 homography per
image and applied with a single grid_sample; colour jitter, the uint8 -> [0, 1] scaling and the random
inversion are all affine per image, so they fold into one more full-size pass. No flips: digits are not
mirror-symmetric. Speed against torchvision's per-image PIL transforms: `python -m common.bench`.
"""
import functools
import math
import zlib

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


def named(name, view):
    """The stream name of an augmentation in the view-th augmented copy of a batch (--consistency): view 0 is
    the plain name, so single-view runs keep their draws."""
    return f"{name}@{view}" if view else name


def stream(key, name, device):
    """The random stream of one named augmentation for one batch, seeded by (key, name): adding or switching
    off another augmentation never changes its draws, so old seeds stay reproducible."""
    seed = (key * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**64
    return torch.Generator(device=device).manual_seed(seed)


def draw(key, name, columns, b, device):
    """U(-1, 1) draws (b, columns) from the stream of `name`."""
    return torch.rand(b, columns, generator=stream(key, name, device), device=device) * 2 - 1


def random_convolution(x, key, cfg, view=0):
    """RandConv (Xu et al., ICLR 2021): a random kernel, 1x1, 3x3, 5x5 or 7x7 with N(0, 1 / fan_in) weights, mixed
    with the image at alpha ~ U(0, 1). Texture and colour change, shape stays. cfg.randconv_per "image": each
    image its own kernel and coin (probability cfg.randconv); "batch": one kernel for the whole batch, which stays
    clean with probability 1 - cfg.randconv (the official code's identity probability). All kernels are
    zero-padded to 7x7, so the batch is one grouped convolution (groups = B)."""
    b, c, h, w = x.shape
    n = 1 if cfg.randconv_per == "batch" else b  # independent draws
    size, alpha, chosen = draw(key, named("randconv", view), 3, n, x.device).expand(b, -1).unbind(1)
    k = ((size + 1) * 2).floor().clamp(max=3) * 2 + 1  # 1, 3, 5 or 7, uniformly
    weights = torch.randn(n, c, c, 7, 7, generator=stream(key, named("randconv_weights", view), x.device),
                          device=x.device).expand(b, -1, -1, -1, -1)
    offset = (torch.arange(7, device=x.device) - 3).abs()
    inside = (offset.view(1, 7, 1) <= k.view(b, 1, 1) // 2) & (offset.view(1, 1, 7) <= k.view(b, 1, 1) // 2)
    weights = weights * inside.view(b, 1, 1, 7, 7) / (c * k * k).sqrt().view(b, 1, 1, 1, 1)
    padded = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")  # no black frame
    convolved = F.conv2d(padded, weights.reshape(b * c, c, 7, 7), groups=b).view(b, c, h, w)
    mixed = torch.lerp(convolved, x, ((alpha + 1) / 2).view(b, 1, 1, 1))
    return torch.where((chosen + 1 < 2 * cfg.randconv).view(b, 1, 1, 1), match(mixed, x, cfg.dg_output), x)


def match(out, x, mode):
    """DG outputs as the network will see them: "unit" as made (RandConv's mix, Pro-RandConv's tanh in [0, 1]);
    "matched": each image and channel moved to the clean image's own mean and std, so the normalization in front
    of the network (the clean train split's statistics) sees inputs in the range it was fitted on."""
    if mode == "unit":
        return out
    mean, std = out.mean((2, 3), keepdim=True), out.std((2, 3), keepdim=True).clamp(min=1e-3)
    return (out - mean) / std * x.std((2, 3), keepdim=True) + x.mean((2, 3), keepdim=True)


def smooth_field(noise, sigma):
    """A Gaussian random field: white noise (B, C, H, W) blurred by a Gaussian of `sigma` pixels (separable,
    reflect-padded), rescaled to unit std per map, so neighbouring pixels move together."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=noise.device, dtype=noise.dtype)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    b, c, h, w = noise.shape
    y = F.pad(noise.reshape(b * c, 1, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(F.conv2d(y, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1)).view(b, c, h, w)
    return y / y.std((2, 3), keepdim=True).clamp(min=1e-6)


def deformable_taps(offsets, h, w):
    """grid_sample grid (B, 9H, W, 2) of a 3x3 deformable convolution's taps: output pixel (i, j), tap (ky, kx)
    reads the input at (i + ky - 1, j + kx - 1) + its offset. `offsets` (B, 18, H, W) as in
    torchvision.ops.deform_conv2d ((dy, dx) per tap, in pixels)."""
    b, device = offsets.shape[0], offsets.device
    ky, kx = torch.meshgrid(torch.arange(3, device=device) - 1., torch.arange(3, device=device) - 1., indexing="ij")
    dy, dx = offsets.view(b, 9, 2, h, w).unbind(2)
    y = torch.arange(h, device=device).view(1, 1, h, 1) + ky.reshape(1, 9, 1, 1) + dy
    x = torch.arange(w, device=device).view(1, 1, 1, w) + kx.reshape(1, 9, 1, 1) + dx
    return torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1).view(b, 9 * h, w, 2)


def deformable_convolution(x, grid, weights, padding="border"):
    """Per-image 3x3 deformable convolution: x (B, C, H, W), grid from deformable_taps, weights (B, O, C, 3, 3).
    One grid_sample gathers all nine taps, one einsum weighs them. Equal to torchvision's deform_conv2d with
    per-image groups (tested) when padding is "zeros"; "border" repeats the edge, so no black frame. 10.7x the
    images/s of one grouped deform_conv2d (groups = B) for 128 images on a 2-core AMD EPYC (`python -m common.bench`)."""
    b, c, h, w = x.shape
    taps = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False).view(b, c, 3, 3, h, w)
    return torch.einsum("bockl,bcklhw->bohw", weights, taps)


def progressive_random_convolution(x, key, cfg, view=0):
    """Pro-RandConv (Choi et al., CVPR 2023): one random 3x3 block, applied L ~ U{1..cfg.prorandconv_layers} times,
    so that the receptive field grows without a large kernel's blur. The block: a deformable convolution
    (Kaiming-normal weights under a Gaussian window of sigma ~ U(0, 1); tap offsets of scale ~ U(0,
    cfg.prorandconv_offset) pixels, i.i.d. per pixel ("white") or a smooth Gaussian random field ("field")),
    standardization of each channel, a random per-channel gain and shift (N(0, cfg.prorandconv_affine^2)), tanh,
    mapped to [0, 1]. cfg.prorandconv_per "image": each image its own block and L; "batch": one block and L for
    the whole batch, a virtual domain per BatchNorm batch (the paper). Each image is chosen with probability
    cfg.prorandconv; the rest stay as they are."""
    b, c, h, w = x.shape
    device = x.device
    n = 1 if cfg.prorandconv_per == "batch" else b  # independent blocks
    drawn = (draw(key, named("prorandconv", view), 4, b, device) + 1) / 2  # per image: its coin, then its block's
    chosen, (layers, sigma, spread) = drawn[:, 0], drawn[:n, 1:].expand(b, -1).unbind(1)  # "batch": image 0's block
    most = cfg.prorandconv_layers
    layers = (layers * most).floor().clamp(max=most - 1) + 1  # 1..most, uniformly
    taps = torch.arange(3, device=device, dtype=torch.float32) - 1
    window = torch.exp(-(taps.view(1, 3, 1) ** 2 + taps.view(1, 1, 3) ** 2) / (2 * sigma.clamp(min=1e-2).view(b, 1, 1) ** 2))
    weights = torch.randn(n, c, c, 3, 3, generator=stream(key, named("prorandconv_weights", view), device), device=device)
    weights = weights.expand(b, -1, -1, -1, -1) * window.view(b, 1, 1, 3, 3) / math.sqrt(c * 9)
    offsets = torch.randn(n, 18, h, w, generator=stream(key, named("prorandconv_offsets", view), device), device=device)
    if cfg.prorandconv_offsets == "field":
        offsets = smooth_field(offsets, cfg.prorandconv_field)
    grid = deformable_taps(offsets.expand(b, -1, -1, -1) * (spread * cfg.prorandconv_offset).view(b, 1, 1, 1), h, w)
    gain, shift = (torch.randn(2, n, c, 1, 1, generator=stream(key, named("prorandconv_affine", view), device),
                               device=device) * cfg.prorandconv_affine).expand(-1, b, -1, -1, -1).unbind(0)
    out, y = x, x
    for layer in range(1, most + 1):  # not to layers.max(): reading it would sync the device every step
        y = deformable_convolution(y, grid, weights, cfg.prorandconv_padding)
        y = torch.tanh(torch.addcmul(shift, F.instance_norm(y), gain))  # instance_norm: each image's channels
        out = torch.where((layers == layer).view(b, 1, 1, 1), (y + 1) / 2, out)
    return torch.where((chosen < cfg.prorandconv).view(b, 1, 1, 1), match(out, x, cfg.dg_output), x)


def noise_texture(b, h, w, generator, device):
    """Colour textures (B, 3, H, W) in [0, 1] with a natural image's falling spectrum: white noise shaped to an
    amplitude 1/f^a, a ~ U(0.5, 2) per image (grainy to cloudy; photographs sit near 1). The channels' means
    are 0.2-0.4 away from grey, all up or all down, so that the contrast-reversed digit of background() stays visible; the
    channels share a random part of one grey field (from one colour to independent colours)."""
    u = torch.rand(b, 7, generator=generator, device=device)
    fy = torch.fft.fftfreq(h, device=device).view(h, 1)
    fx = torch.fft.rfftfreq(w, device=device).view(1, -1)
    f = (fy ** 2 + fx ** 2).sqrt().clamp(min=1 / max(h, w))  # the DC term gets the lowest frequency's weight
    exponent = (0.5 + 1.5 * u[:, 0]).view(b, 1, 1, 1)
    white = torch.randn(b, 3, h, w, generator=generator, device=device)
    field = torch.fft.irfft2(torch.fft.rfft2(white) * f.pow(-exponent), s=(h, w))
    field = torch.lerp(field, field.mean(1, keepdim=True), u[:, 1].view(b, 1, 1, 1))
    field = (field - field.mean((2, 3), keepdim=True)) / field.std((2, 3), keepdim=True).clamp(min=1e-6)
    mean = 0.5 + torch.where(u[:, 2:3] < 0.5, -1, 1) * (0.2 + 0.2 * u[:, 3:6])  # one sign: muted colours
    contrast = 0.05 + 0.15 * u[:, 6]
    return (mean.view(b, 3, 1, 1) + contrast.view(b, 1, 1, 1) * field).clamp(0, 1)


def background(x, coverage, key, cfg, view=0):
    """Clutter behind the digit: each image chosen with probability cfg.background is redrawn as a noise_texture
    background with the digit on top, alpha = its coverage (the warped grey in [0, 1], before colour and
    inversion: MNIST and USPS digits are light on black), the digit filled with the background's contrast-reversed
    texture, so it stays visible on any texture. MNIST's background is black in every image; SVHN's and
    MNIST-M's never are. (This knows how MNIST-M was made, a digit blended over a photo patch: its gain on the
    MNIST-M dev set is partly by construction, and SVHN, held out, is the fair test.)"""
    b, _, h, w = x.shape
    generator = stream(key, named("background", view), x.device)
    chosen = torch.rand(b, generator=generator, device=x.device) < cfg.background
    texture = noise_texture(b, h, w, generator, x.device)
    cluttered = torch.lerp(texture, 1 - texture, coverage)
    return torch.where(chosen.view(b, 1, 1, 1), cluttered, x)


def amplitude_perturbation(x, key, cfg, view=0):
    """Random low-frequency amplitude perturbation, phase kept (the random variant of AdvFrequency, Wang et al.
    2024; FACT's amplitude mixing, Xu et al. CVPR 2021, with a random spectrum instead of another image's). Each
    image chosen with probability cfg.amplitude has the Fourier amplitude of each channel multiplied, at every
    frequency within cfg.amplitude_band of the lowest (cycles per pixel), by exp(cfg.amplitude_scale * N(0, 1)):
    colour, contrast and texture of large areas change, the phase that carries the digit's shape does not. The
    gain is symmetric in frequency (a real image stays real) and 1 at the DC term (each channel keeps its mean)."""
    b, c, h, w = x.shape
    generator = stream(key, named("amplitude", view), x.device)
    chosen = torch.rand(b, generator=generator, device=x.device) < cfg.amplitude
    fy = torch.fft.fftfreq(h, device=x.device).view(h, 1)
    fx = torch.fft.fftfreq(w, device=x.device).view(1, w)
    low = ((fy ** 2 + fx ** 2).sqrt() <= cfg.amplitude_band) & ((fy != 0) | (fx != 0))
    noise = torch.randn(b, c, h, w, generator=generator, device=x.device)
    noise = (noise + torch.roll(noise.flip(-2, -1), (1, 1), (-2, -1))) / 2  # g(f) = g(-f)
    gain = torch.where(low, torch.exp(cfg.amplitude_scale * noise), torch.ones_like(noise))
    perturbed = torch.fft.ifft2(torch.fft.fft2(x) * gain).real
    return torch.where(chosen.view(b, 1, 1, 1), perturbed, x)


def homographies(angle, shear, sx, sy, tx, ty):
    """Output pixel -> input pixel maps (B, 3, 3) in grid_sample's [-1, 1] coordinates: crop scale (sx, sy) .
    rotation (radians) . x-shear (radians), then the shift (tx, ty). On an image this is torchvision's
    affine(angle=-degrees(angle), shear=(-degrees(shear), 0)) for a centred square crop: tests pin it."""
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([
        torch.stack([sx * cos, sx * (cos * tan - sin), tx], -1),
        torch.stack([sy * sin, sy * (sin * tan + cos), ty], -1),
        torch.stack([zero, zero, one], -1)], 1)


def warp(images, homography):
    """uint8 (B, 3, H, W) resampled through per-image homographies: float, still 0..255 (bilinear sampling is
    linear in the pixel values, so the 1/255 joins the colour pass)."""
    b, device = images.shape[0], images.device
    h, w = images.shape[-2:]
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1  # pixel centres, align_corners=False
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    gx, gy = xs.view(1, 1, w), ys.view(1, h, 1)
    # Broadcast multiply-adds, not a batched matmul of (H*W x 3) @ (3 x 3): 8 ms -> under 1 ms for 512 images.
    hm = homography.reshape(b, 9, 1, 1).unbind(1)
    z = (hm[6] * gx + hm[8]) + hm[7] * gy  # (b, 1, w) + (b, h, 1): only the last add is full-size
    grid = torch.stack([(hm[0] * gx + hm[2]) + hm[1] * gy, (hm[3] * gx + hm[5]) + hm[4] * gy], -1).div_(z.unsqueeze(-1))
    # Border fill: SVHN crops continue past their edges, so a black frame would be a tell-tale artefact.
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour(x, brightness=None, contrast=None, saturation=None, flip=None):
    """x in 0..255 -> [0, 1], in one affine pass per image: out = gain * x + offset, clamped. Brightness, then
    contrast about the mean grey, then saturation about each pixel's grey, as torchvision's adjust_* in that
    order (the same while no intermediate value clips): alpha * (s * x + (1 - s) * grey) + beta. Then the
    inversion of the images where `flip`, since 1 - clamp(y, 0, 1) = clamp(1 - y, 0, 1)."""
    b, device = x.shape[0], x.device
    gain = torch.full((b, 1, 1, 1), 1 / 255, device=device)
    offset = torch.zeros((b, 1, 1, 1), device=device)
    if brightness is not None:
        brightness, contrast, saturation = (t.view(b, 1, 1, 1) for t in (brightness, contrast, saturation))
        grey = (x * _constants(device)[2]).sum(1, keepdim=True)
        alpha = brightness * contrast / 255
        beta = brightness * grey.mean((2, 3), keepdim=True) * (1 - contrast) / 255
        gain, offset = alpha * saturation, torch.addcmul(beta, grey, alpha * (1 - saturation))
    if flip is not None:
        flip = flip.view(b, 1, 1, 1)
        sign = 1 - 2 * flip.float()
        gain, offset = gain * sign, offset * sign + flip
    return torch.addcmul(offset, x, gain).clamp_(0, 1)


def augment(images, cfg, key, view=0):
    """images: uint8 (B, 3, H, W) -> float, in [0, 1] unless randconv mixes in a random convolution. Strengths
    come from cfg (rotate, shear, translate, crop_scale, perspective, jitter, invert, randconv); each image
    draws its own parameters, each augmentation from its own stream seeded by (key, its name), on the images'
    device."""
    b, device = images.shape[0], images.device
    zero = torch.zeros(b, device=device)
    # --consistency-geometry shared: every view of an image gets view 0's warp and colour, as AugMix's views share
    # one base image; the cross-domain augmentations below always draw per view.
    geometry_view = 0 if cfg.consistency_geometry == "shared" else view

    def uniform(name, columns):
        return draw(key, named(name, geometry_view), columns, b, device).unbind(1)

    angle = uniform("rotate", 1)[0] * math.radians(cfg.rotate) if cfg.rotate else zero
    shear = uniform("shear", 1)[0] * math.radians(cfg.shear) if cfg.shear else zero
    sx = sy = zero + 1
    tx = ty = zero
    if cfg.crop_scale:
        u_area, u_aspect, u_x, u_y = uniform("crop", 4)
        area = 1 - cfg.crop_scale * (u_area + 1) / 2
        aspect = torch.exp(u_aspect * math.log(4 / 3))
        sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
        tx, ty = u_x * (1 - sx), u_y * (1 - sy)  # the crop window stays inside the image
    if cfg.translate:  # then shifted by up to `translate` of the size
        u_x, u_y = uniform("translate", 2)
        tx, ty = tx + u_x * 2 * cfg.translate, ty + u_y * 2 * cfg.translate
    homography = homographies(angle, shear, sx, sy, tx, ty)
    if cfg.perspective:
        displacement = torch.stack(uniform("perspective", 8), 1).view(b, 4, 2) * 2 * cfg.perspective
        homography = homography @ _perspective(displacement)
    x = warp(images, homography)
    coverage = x.mean(1, keepdim=True).div(255).clamp(0, 1) if cfg.background else None
    jitter = [1 + u * cfg.jitter for u in uniform("jitter", 3)] if cfg.jitter else [None] * 3
    flip = draw(key, named("invert", view), 1, b, device)[:, 0] + 1 < 2 * cfg.invert if cfg.invert else None
    x = colour(x, *jitter, flip=flip)
    if cfg.background:
        x = background(x, coverage, key, cfg, view)
    if cfg.randconv:
        x = random_convolution(x, key, cfg, view)
    if cfg.prorandconv:
        x = progressive_random_convolution(x, key, cfg, view)
    if cfg.amplitude:
        x = amplitude_perturbation(x, key, cfg, view)
    return x
