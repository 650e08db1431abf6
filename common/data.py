"""The digit domains as uint8 N x 3 x 32 x 32 tensors with int64 labels 0-9, plus splits and subsets.

SVHN and MNIST are the study's two datasets: a missing file is downloaded through torchvision into a
temporary folder and moved into place only when complete, or the run stops with one line. MNIST-M and
USPS are extra test domains: used when their files are present, skipped and named when not (no download).
Files are read by structure (keys, shapes, dtype, label range), so honest subsets and test fixtures
load; torchvision's checksums apply only to what it downloads. load_sets() assembles a run's Data: the
source's labelled split, every present domain's test set and the dev sets.
"""
import bz2
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from .errors import UserError
from .plumbing import readable_file

DOMAINS = ("svhn", "mnist", "mnistm", "usps")
TITLES = dict(svhn="SVHN", mnist="MNIST", mnistm="MNIST-M", usps="USPS")
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_PROVIDE = ("Run once with internet access to download it, or copy the official file there "
                  "(SVHN: D/{train,test}_32x32.mat; MNIST: D/MNIST/raw/*-ubyte, uncompressed), "
                  "or pass --data-dir D.")


def load(dataset, split, root):
    """(images uint8 N x 3 x 32 x 32, labels int64 N) of one split of a domain under root; None for an optional
    domain whose files are absent."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is a file, not a folder")
    loaders = dict(svhn=_load_svhn, mnist=_load_mnist, mnistm=_load_mnistm, usps=_load_usps)
    return loaders[dataset](root, split)


def where(dataset, root):
    """Where a domain's files are looked for, for the line that names a skipped domain."""
    return dict(svhn=f"{root}/{{train,test}}_32x32.mat", mnist=f"{root}/MNIST/raw",
                mnistm=f"{root}/mnist_m/mnist_m_{{train,test}}.npz (or the release's PNG folders)",
                usps=f"{root}/USPS/usps{{,.t}}.bz2")[dataset]


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
    readable_file(path)
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
    readable_file(path)
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
    # torchvision's own readers of one IDX file each: its MNIST class insists on both splits being present
    images, labels = read_image_file(str(root / files[0])), read_label_file(str(root / files[1]))
    if len(images) != len(labels) or len(labels) == 0 or labels.max() > 9:
        raise UserError(f"{root / files[0]} and its labels disagree: {len(images)} images, {len(labels)} labels in 0..9 expected")
    # Resized (bilinear) rather than zero-padded to 32x32: the digit then fills the frame as SVHN's centre
    # digit does, which is the fairer cross-domain test; padding would add a scale shift on top of the style shift.
    # In chunks: float copies of all 60,000 images at once would add ~700 MiB to the loading peak.
    return grey_to_32(images), labels.long()


def grey_to_32(images):
    """uint8 (N, H, W) grey digits -> (N, 3, 32, 32), bilinear with antialiasing. In chunks: float copies of all
    60,000 MNIST images at once would add ~700 MiB to the loading peak. Grey stays one channel in memory;
    expand() shows it as RGB without copying (a third of the memory)."""
    resized = torch.cat([F.interpolate(chunk[:, None].float(), size=(32, 32), mode="bilinear", antialias=True)
                         .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(10_000)])
    return resized.expand(-1, 3, -1, -1)


MNISTM_NPZ = {"train": ("mnist_m_train.npz", "mnist_m_train10k.npz"), "test": ("mnist_m_test.npz",)}


def _load_mnistm(root, split):
    """MNIST-M (Ganin & Lempitsky 2015): an npz with x uint8 (N, 32, 32, 3) and y 0-9, or the release layout
    mnist_m/mnist_m_<split>/*.png with mnist_m_<split>_labels.txt ("name label" per line)."""
    folder = root / "mnist_m"
    npz = next((folder / n for n in MNISTM_NPZ[split] if (folder / n).exists()), None)
    if npz is not None:
        readable_file(npz)
        try:
            with np.load(npz, allow_pickle=False) as arrays:
                x, y = arrays["x"], arrays["y"]
        except (KeyError, ValueError, OSError, EOFError, MemoryError, zipfile.BadZipFile) as e:
            # MemoryError: a header that declares far more images than the file holds
            raise UserError(f"{npz} is not an MNIST-M npz with keys x and y ({type(e).__name__})") from None
        if y.ndim == 2 and y.shape[1] == 1:  # labels as an (N, 1) column, a common layout
            y = y[:, 0]
    elif (folder / f"mnist_m_{split}_labels.txt").exists():
        x, y = _read_mnistm_pngs(folder, split)
    else:
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{npz or folder}: MNIST-M images must be uint8 (N, 32, 32, 3) with one label each, "
                        f"got {x.dtype} {x.shape} and {len(y)} labels")
    _check_labels(npz or folder, y, 0, 9)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype("int64"))


def _read_mnistm_pngs(folder, split):
    """The release's layout: mnist_m_<split>/<name>.png, and mnist_m_<split>_labels.txt with "name label" per line.
    Names must be plain file names inside that folder; every image must be a 32x32 picture."""
    labels_file, images_dir = folder / f"mnist_m_{split}_labels.txt", folder / f"mnist_m_{split}"
    readable_file(labels_file)
    try:
        rows = [line.split() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{labels_file}: not UTF-8 text; each line must be 'name label'") from None
    if not rows or any(len(r) != 2 or not (r[1].isascii() and r[1].isdigit()) for r in rows):
        raise UserError(f"{labels_file}: each line must be 'name label' (label an ASCII digit 0-9)")
    outside = next((name for name, _ in rows if Path(name).name != name or name in (".", "..")), None)
    if outside:
        raise UserError(f"{labels_file} names {outside!r}: images must be plain file names inside {images_dir}")
    images = []
    for name, _ in rows:
        path = readable_file(images_dir / name, inside=images_dir)  # a symlink out of the folder is refused too
        try:
            with Image.open(path) as image:
                if image.size != (32, 32):
                    raise UserError(f"{path} is {image.size[0]}x{image.size[1]}; MNIST-M images are 32x32")
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, Image.DecompressionBombError, ValueError) as e:
            raise UserError(f"{path} is not a readable image ({type(e).__name__})") from None
    return np.stack(images), np.array([int(r[1]) for r in rows])


def _load_usps(root, split):
    """USPS in torchvision's files (LIBSVM text, bz2) under D/USPS: "label i:v ..." per image, label 1..10, 256
    values in [-1, 1] for 16x16 grey, shown as MNIST is. Read and checked here, line by line, before any training
    (torchvision's reader turns a short line or a value out of range into garbage pixels); the pixels are
    torchvision's ((v + 1) / 2 * 255, truncated to uint8)."""
    path = root / "USPS" / ("usps.bz2" if split == "train" else "usps.t.bz2")
    if not path.exists():
        return None
    readable_file(path)
    try:
        with bz2.open(path, "rt", encoding="ascii") as f:
            rows = [line.split() for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a USPS file in torchvision's format ({type(e).__name__})") from None
    bad = next((i for i, r in enumerate(rows) if len(r) != 257), None)
    if not rows or bad is not None:
        raise UserError(f"{path}: line {(bad or 0) + 1} has {len(rows[bad]) - 1 if rows else 0} values; each USPS line "
                        "is a label and 256 'index:value' pairs")
    try:
        labels = np.array([int(r[0]) for r in rows]) - 1
        values = np.array([[float(x.split(":")[-1]) for x in r[1:]] for r in rows], dtype=np.float32)
    except ValueError as e:
        raise UserError(f"{path}: {e}; each USPS line is a label and 256 'index:value' pairs") from None
    if not (np.isfinite(values).all() and values.min() >= -1 and values.max() <= 1):
        finite = values[np.isfinite(values)]
        found = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite value"
        raise UserError(f"{path}: pixel values must lie in [-1, 1], found {found}"
                        f"{' and NaN or infinity' if finite.size < values.size else ''}")
    _check_labels(path, labels, 0, 9)
    images = ((values.reshape(-1, 16, 16) + 1) / 2 * 255).astype(np.uint8)
    return grey_to_32(torch.from_numpy(images)), torch.from_numpy(labels.astype("int64"))


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


# --- a run's images: the source's labelled split, every present domain's test set, the dev sets ------------

@dataclass
class Data:
    """A run's images, uint8 on its device, each split as (images, labels)."""
    source_train: tuple
    source_val: tuple   # carved from the source's labelled images: the only set that picks an epoch
    test_sets: dict     # {domain: split}: the test split of every present domain, the source's included
    dev_sets: dict      # {domain: split}: training files of other domains, never trained on: they choose recipes
    skipped: dict       # {domain: where its files were looked for}: optional domains that are absent


def labelled_split(labels, cfg):
    """(train, val) indices into the training file. --train-subset N is the whole label budget: N images
    drawn with the run's seed (so seeds resample which images are labelled), validation carved out of them.
    Without it, validation is a fixed 5% of the file, the same for every run and seed."""
    labelled = torch.arange(len(labels))
    if cfg.train_subset:
        labelled = stratified_subset(labels, cfg.train_subset, seed=cfg.seed, what="--train-subset")
    train_pos, val_pos = split_train_val(len(labelled), cfg.val_fraction)
    if len(train_pos) == 0:
        raise UserError(f"--train-subset {len(labelled)} leaves no training image after the validation split")
    return labelled[train_pos], labelled[val_pos]


def capped(split, cap, device):
    """A stratified subset of at most `cap` images (0: all), moved to the device."""
    x, y = split
    keep = stratified_subset(y, cap) if 0 < cap < len(y) else slice(None)
    return x[keep].to(device), y[keep].to(device)


def dev_domains(source):
    """Selection domains: every other domain's training file, but never SVHN's when SVHN is not the source:
    SVHN is the held-out domain of the MNIST-trained models and informs no choice."""
    return [d for d in DOMAINS if d not in (source, "svhn")]


def load_domains(cfg, device, announce=True):
    """(test sets, dev sets, skipped): the test split of every present domain, the dev sets of cfg.dataset, and
    the optional domains whose files are absent, named with where they were looked for (printed once)."""
    tests, dev, skipped = {}, {}, {}
    for domain in DOMAINS:
        test_split = load(domain, "test", cfg.data_dir)
        if test_split is None:
            skipped[domain] = where(domain, cfg.data_dir)
            continue
        tests[domain] = capped(test_split, cfg.eval_subset, device)
        if domain not in dev_domains(cfg.dataset):
            continue
        dev_split = load(domain, "train", cfg.data_dir)
        if dev_split is None:  # its test file is here, its train file is not: recipes would be chosen without it
            skipped[f"dev_{domain}"] = where(domain, cfg.data_dir)
            continue
        dev[domain] = capped(dev_split, min(cfg.eval_subset or cfg.dev_images, cfg.dev_images), device)
    if skipped and announce:
        print("skipped (files absent): " + "; ".join(f"{TITLES[d] if d in TITLES else 'dev set ' + TITLES[d[4:]]} ({w})"
                                                     for d, w in skipped.items()))
    return tests, dev, skipped


def input_stats(images):
    """Per-channel mean and std of the training split (a 10k sample is exact to 3 decimals)."""
    sample = images[:10_000].float() / 255
    return sample.mean((0, 2, 3)).tolist(), sample.std((0, 2, 3)).clamp(min=1e-3).tolist()


def load_sets(cfg, device, announce=True):
    """Data of cfg on the device: the source's train/val split (--train-subset, --val-fraction), the test split of
    every present domain and the dev sets; --eval-subset caps validation, test and dev sets."""
    x, y = load(cfg.dataset, "train", cfg.data_dir)
    train_idx, val_idx = labelled_split(y, cfg)
    if cfg.eval_subset:
        val_idx = val_idx[stratified_subset(y[val_idx], min(cfg.eval_subset, len(val_idx)))]
    return Data((x[train_idx].to(device), y[train_idx].to(device)), (x[val_idx].to(device), y[val_idx].to(device)),
                *load_domains(cfg, device, announce))


def sizes(data, cfg):
    """What metrics.json records of a run's data: the label budget, each set's size, what chose what."""
    return dict(labels_used=len(data.source_train[1]) + len(data.source_val[1]), skipped_domains=data.skipped,
                selection=dict(epoch=f"{cfg.dataset} validation split", recipe=sorted(data.dev_sets)),
                data=dict(train=len(data.source_train[1]), val=len(data.source_val[1]),
                          **{f"dev_{k}": len(v[1]) for k, v in data.dev_sets.items()},
                          **{f"test_{k}": len(v[1]) for k, v in data.test_sets.items()}))
