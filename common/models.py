"""BasicBlock / ResNet-18 for 32x32 digits, and torchvision's ImageNet ResNet-18 adapted to them."""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .errors import UserError
from .plumbing import readable_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class StridedPointwise(nn.Conv2d):
    """A 1x1 convolution with stride s computed as subsampling then a stride-1 1x1 convolution: the same
    numbers and state dict as nn.Conv2d(c_in, c_out, 1, s). torch 2.14.1's CPU weight gradient of a strided
    1x1 convolution on channels_last input crashes the process (segfault or heap corruption) for every odd
    batch size >= 3, seen here; this path does not, at ~4% of a bf16 train step (113 vs 119 images/s here)."""

    def forward(self, x):
        s = self.stride[0]
        return F.conv2d(x[..., ::s, ::s], self.weight, self.bias)

    @classmethod
    def like(cls, conv):
        new = cls(conv.in_channels, conv.out_channels, 1, conv.stride, bias=conv.bias is not None)
        new.load_state_dict(conv.state_dict())
        return new


class IBN(nn.Module):
    """IBN-Net-a's normalization (Pan et al., ECCV 2018): the first `ratio` of the channels instance-normalized
    (with an affine), the rest batch-normalized. Instance normalization drops each image's own feature means and
    variances, the appearance (colour, texture, contrast) that a new domain changes; the BN half keeps what tells
    the classes apart. In eval mode the IN half still uses each image's own statistics: it has no running ones.
    A bf16 training step at width 56 costs about a fifth more than with BatchNorm alone (2-core AMD EPYC)."""

    def __init__(self, channels, ratio=0.5):
        super().__init__()
        self.half = int(channels * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x):
        instance, batch = x.split([self.half, x.shape[1] - self.half], 1)
        return torch.cat([self.IN(instance), self.BN(batch)], 1)


def norm_layer(norm, channels, ibn=0.0):
    if norm != "batch":
        return nn.Identity()
    return IBN(channels, ibn) if ibn else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, norm, ibn=0.0):
        super().__init__()
        bias = norm == "none"  # BatchNorm's shift makes a conv bias redundant; without BN it is needed
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.bn1 = norm_layer(norm, c_out, ibn)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.bn2 = norm_layer(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(StridedPointwise(c_in, c_out, 1, stride, bias=bias), norm_layer(norm, c_out))
        # Without BN nothing rescales the residual stream, which grows with depth until the loss overflows:
        # each branch gets a learnable scalar gain starting at zero (SkipInit, De & Smith 2020), so every
        # block starts as the identity, and norm="none" trains at lr 0.05-0.1 without diverging.
        # (With BN we keep torchvision's default init: zero-initialising the last BN scale as well slowed the
        # first 30 steps on MNIST from 94% to 43% train accuracy here.)
        self.gain = nn.Parameter(torch.zeros(())) if norm == "none" else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.gain is not None:
            out = out * self.gain
        return F.relu(out + self.shortcut(x))


class MixStyle(nn.Module):
    """MixStyle (Zhou et al., ICLR 2021): in training, with probability p per batch, each image's feature maps are
    re-styled with the channel mean and std mixed with those of another image of the batch, lambda ~ Beta(alpha,
    alpha); the statistics are detached, as in the paper. The identity in eval mode. No parameters or buffers,
    so a state dict is the same with or without it."""

    def __init__(self, p=0.5, alpha=0.1):
        super().__init__()
        self.p, self.alpha = p, alpha

    def forward(self, x, weight=None):
        if not self.training or (weight is None and torch.rand(()).item() >= self.p):
            return x
        b = x.shape[0]
        if weight is None:  # drawn on the features' device: no host-to-device copy per step
            alpha = torch.tensor(self.alpha, device=x.device)
            weight = torch.distributions.Beta(alpha, alpha).sample((b, 1, 1, 1))
        features = x.float()  # statistics in fp32 under autocast
        mean = features.mean((2, 3), keepdim=True).detach()
        std = (features.var((2, 3), keepdim=True) + 1e-6).sqrt().detach()
        other = torch.randperm(b, device=x.device)
        mixed_mean = torch.lerp(mean[other], mean, weight)
        mixed_std = torch.lerp(std[other], std, weight)
        return ((features - mean) / std * mixed_std + mixed_mean).to(x.dtype)


class ResNet(nn.Module):
    """ResNet with a 32x32 stem: one 3x3 conv, no max-pool, so the first stage runs at full resolution."""

    def __init__(self, blocks_per_stage, num_classes=10, norm="batch", width=64, mixstyle=0.0, mixstyle_alpha=0.1,
                 ibn=0.0):
        super().__init__()
        widths = [width * 2 ** i for i in range(len(blocks_per_stage))]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=norm == "none"), norm_layer(norm, width), nn.ReLU())
        layers, c_in = [], width
        for i, (n, c_out) in enumerate(zip(blocks_per_stage, widths)):
            for j in range(n):
                # IBN-Net-a: in every block of all stages but the last, whose features must tell the classes apart
                layers.append(BasicBlock(c_in, c_out, 2 if i > 0 and j == 0 else 1, norm,
                                         ibn if i < len(blocks_per_stage) - 1 else 0.0))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        # MixStyle after the first two stages: early features hold style, late ones the class (the paper's choice)
        self.mixstyle = MixStyle(mixstyle, mixstyle_alpha) if mixstyle else None
        self.mix_after = {sum(blocks_per_stage[:1]) - 1, sum(blocks_per_stage[:2]) - 1}
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.layers):
            x = block(x)
            if self.mixstyle is not None and i in self.mix_after:
                x = self.mixstyle(x)
        return self.fc(x.mean((2, 3)))  # adaptive_avg_pool2d's CUDA backward is not deterministic; a mean is


def resnet18(num_classes=10, norm="batch", width=64, mixstyle=0.0, mixstyle_alpha=0.1, ibn=0.0):
    return ResNet([2, 2, 2, 2], num_classes, norm, width, mixstyle, mixstyle_alpha, ibn)


class Normalize(nn.Module):
    """Inputs are floats in [0, 1]; the statistics travel with the weights, so a saved model is self-contained."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def set_input_stats(model, mean, std):
    """Point the Normalize in front of a loaded model at new statistics (those of the data it now trains on)."""
    normalize = next(m for m in model.modules() if isinstance(m, Normalize))
    normalize.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
    normalize.std.copy_(torch.tensor(std).view(1, 3, 1, 1))


class StandardizeImage(nn.Module):
    """Each image minus its own mean, over its own std: what is left is shape, not lighting or ink colour."""

    def forward(self, x):
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) / x.std((1, 2, 3), keepdim=True).clamp(min=1e-2)


class Edges(nn.Module):
    """A colour- and polarity-free view of each image: the gradient magnitude of its grey (Sobel), standardized
    per image and shown on all three channels. Light-on-dark and dark-on-light digits, on any texture, give the
    same strokes' outlines; at train and test time alike."""

    def __init__(self):
        super().__init__()
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernels", torch.stack([sobel, sobel.T]).unsqueeze(1), persistent=False)
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        grey = (x.float() * self.grey).sum(1, keepdim=True)
        gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), self.kernels)
        magnitude = gradients.pow(2).sum(1, keepdim=True).add(1e-6).sqrt()
        magnitude = (magnitude - magnitude.mean((2, 3), keepdim=True)) / magnitude.std((2, 3), keepdim=True).clamp(min=1e-2)
        return magnitude.expand(-1, 3, -1, -1).to(x.dtype)


class GlobalAvgPool(nn.Module):
    """torchvision's AdaptiveAvgPool2d(1) as a mean: same numbers, and a deterministic CUDA backward."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


class Resize(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def imagenet_weights_file(weights):
    """The ImageNet state dict: --weights PATH, else torchvision's cache, downloading it when online."""
    api = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    if weights:
        if not Path(weights).exists():
            raise UserError(f"--weights {weights}: no such file")
        return readable_file(weights, "--weights ")  # a FIFO or /dev/zero would block or never end
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(api.url).name
    if not cached.exists():
        try:
            api.get_state_dict(progress=False)  # torch.hub writes to a temp file, renamed when complete
        except Exception as e:
            raise UserError(f"ImageNet weights missing: expected {cached} (torchvision's cache; TORCH_HOME moves it) "
                            f"and the download failed ({type(e).__name__}). Place {api.url} there, "
                            "or pass --weights PATH.") from None
    return cached


def imagenet_resnet18(transfer_input="upsample64", weights="", pretrained=True, num_classes=10):
    """torchvision's ResNet-18 with ImageNet weights, fed 32x32 digits in one of three ways.

    upsample64  (default) 2x bilinear upsampling and no max-pool: layer1 sees 32x32 maps as in our
                ResNet, every pretrained weight is kept, and a forward costs what our ResNet-18's does.
    upsample224 the ImageNet resolution and stem: the most faithful, and the most compute.
    stem3x3     a new 3x3 stride-1 stem and no max-pool: the first conv starts from scratch.
    Forward FLOPs of each, counted: flops_per_image() and README "Speed".
    """
    net = torchvision.models.resnet18()
    if pretrained:
        path = imagenet_weights_file(weights)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            reason = " ".join(str(e).split())[:200]  # torch's message spans lines: one line here
            raise UserError(f"{path} is not a ResNet-18 state dict ({type(e).__name__}: {reason})") from None
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    net.avgpool = GlobalAvgPool()
    for block in (*net.layer2, *net.layer3, *net.layer4):
        if block.downsample is not None:
            block.downsample[0] = StridedPointwise.like(block.downsample[0])
    layers = []
    if transfer_input == "stem3x3":
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif transfer_input == "upsample64":
        layers.append(Resize(64))
        net.maxpool = nn.Identity()
    else:
        layers.append(Resize(224))
    return layers, net


def flops_per_image(model):
    """Forward FLOPs (multiply-add = 2) of one 32x32 image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.rand(1, 3, 32, 32, device=next(model.parameters()).device))
    return counter.get_total_flops()


def build_model(cfg, mean, std, pretrained=True):
    """The network of a config, with input normalization in front. `pretrained=False` skips ImageNet
    weights: 05's control (cfg.pretrained), or a model whose state is loaded right after."""
    if cfg.input_norm == "image":  # for the ImageNet network too: its inputs then have the scale it expects
        front = StandardizeImage()
    elif cfg.input_norm == "edges":
        front = Edges()
    else:
        front = Normalize(IMAGENET_MEAN, IMAGENET_STD) if cfg.arch == "imagenet_resnet18" else Normalize(mean, std)
    if cfg.arch == "imagenet_resnet18":
        resize, net = imagenet_resnet18(cfg.transfer_input, cfg.weights, pretrained)
        return nn.Sequential(front, *resize, net)
    return nn.Sequential(front, resnet18(10, cfg.norm, cfg.width, cfg.mixstyle, cfg.mixstyle_alpha, cfg.ibn))
