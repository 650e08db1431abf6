"""SVHN and MNIST as uint8 N x 3 x 32 x 32 tensors with int64 labels 0-9, plus splits and subsets.

Files are read by structure (keys, shapes, dtype, label range), so honest subsets and test fixtures
load; torchvision's checksums apply only to what it downloads. A missing file is downloaded through
torchvision into a temporary folder and moved into place only when complete.
"""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
import torchvision

from .config import UserError

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_PROVIDE = ("Run once with internet access to download it, or copy the official file there "
                  "(SVHN: D/{train,test}_32x32.mat; MNIST: D/MNIST/raw/*-ubyte, uncompressed), "
                  "or pass --data-dir D.")


def load(dataset, split, root):
    """(images uint8 N x 3 x 32 x 32, labels int64 N) of one split of svhn or mnist under root."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is a file, not a folder")
    if dataset == "svhn":
        return _load_svhn(root, split)
    return _load_mnist(root, split)


def _download(root, files, fetch):
    """Fetch with torchvision into a scratch folder beside root; move files in only once all are complete."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as scratch:
        try:
            fetch(scratch)
        except Exception as e:  # torchvision raises URLError, RuntimeError or OSError when offline
            missing = ", ".join(str(root / f) for f in files)
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"missing {missing} and the download failed ({reason}). {HOW_TO_PROVIDE}") from None
        try:
            for f in files:
                (root / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(Path(scratch) / f), root / f)
        except OSError as e:
            raise UserError(f"could not move the downloaded {', '.join(map(str, files))} into {root} ({e.strerror or e})") from None


def _readable(path):
    """A file we may not open is a permission problem, not a corrupt file: say which."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None


def _check_labels(path, y, low, high):
    """Finite integers in [low, high]: NaN passes a range check and then casts to a class."""
    if y.dtype.kind not in "iuf" or len(y) == 0:
        raise UserError(f"{path}: labels must be numbers, got {y.dtype} with {len(y)} entries")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        bad = int((~np.isfinite(y) | (y != np.round(y))).sum())
        raise UserError(f"{path}: {bad} label(s) are NaN, infinite or fractional; labels must be integers")
    if y.min() < low or y.max() > high:
        raise UserError(f"{path}: labels must lie in {low}..{high}, found {y.min():g}..{y.max():g}")


def _load_svhn(root, split):
    path = root / SVHN_FILES[split]
    if not path.exists():
        _download(root, [path.name], lambda d: torchvision.datasets.SVHN(d, split=split, download=True))
    _readable(path)
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable .mat file ({type(e).__name__}: {e}). "
                        "Delete it to download it again, or replace it.") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise UserError(f"{path} lacks the keys 'X' and 'y' of the SVHN format (has: {sorted(k for k in mat if not k.startswith('__'))})")
    if x.dtype != "uint8" or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UserError(f"{path}: X must be uint8 of shape (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1)
    if len(y) != x.shape[3]:
        raise UserError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    _check_labels(path, y, 1, 10)  # 10 is digit 0
    images = torch.from_numpy(x).permute(3, 2, 0, 1).contiguous()
    labels = torch.from_numpy(y.astype("int64")) % 10
    return images, labels


def _check_idx(path, magic, ndim):
    """The IDX header torchvision's reader would assert on, checked here to name the file and the fault."""
    _readable(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or int.from_bytes(header[:4], "big") != magic:
        raise UserError(f"{path} is not an MNIST IDX file (magic number must be {magic:#010x}). "
                        "Delete it to download it again, or replace it.")
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + torch.Size(dims).numel()
    if size != expected:
        raise UserError(f"{path} has {size} bytes but its header {dims} says {expected}: truncated or corrupt. "
                        "Delete it to download it again, or replace it.")


def _load_mnist(root, split):
    names = MNIST_FILES[split]
    files = [Path("MNIST/raw") / n for n in names]
    if not all((root / f).exists() for f in files):
        _download(root, files, lambda d: torchvision.datasets.MNIST(d, train=split == "train", download=True))
    _check_idx(root / files[0], 0x00000803, 3)
    _check_idx(root / files[1], 0x00000801, 1)
    mnist = torchvision.datasets.MNIST(root, train=split == "train", download=False)
    images, labels = mnist.data, mnist.targets
    if len(images) != len(labels) or len(labels) == 0 or labels.max() > 9:
        raise UserError(f"{root / files[0]} and its labels disagree: {len(images)} images, {len(labels)} labels in 0..9 expected")
    # Resized (bilinear) rather than zero-padded to 32x32: the digit then fills the frame as SVHN's centre
    # digit does, which is the fairer cross-domain test; padding would add a scale shift on top of the style shift.
    # In chunks: float copies of all 60,000 images at once would add ~700 MiB to the loading peak.
    resized = torch.cat([F.interpolate(chunk[:, None].float(), size=(32, 32), mode="bilinear", antialias=True)
                         .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(10_000)])
    # Grey stays one channel in memory; expand() shows it as RGB without copying (a third of the memory).
    return resized.expand(-1, 3, -1, -1), labels.long()


def split_train_val(n, val_fraction, seed=0):
    """Disjoint (train, val) index tensors. Fixed seed: every run and seed sees the same validation set."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def stratified_subset(labels, size, seed=0, what="subset"):
    """Indices of `size` samples keeping the class proportions of `labels` (largest-remainder quotas)."""
    n = len(labels)
    if size > n:
        raise UserError(f"{what} of {size} requested but only {n} images are available")
    counts = torch.bincount(labels, minlength=10).double()
    exact = counts * size / n
    quota = exact.floor().long()
    leftover = size - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True)[:leftover]] += 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    chosen = [perm[shuffled == c][: quota[c]] for c in range(len(counts))]
    return torch.cat(chosen).sort().values
