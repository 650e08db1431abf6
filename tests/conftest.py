"""Fixtures written in the real file formats (SVHN .mat via scipy, MNIST IDX, USPS as torchvision's bz2
LIBSVM text, MNIST-M as npz and as the release's PNG folders), so the tests run the real loading code.
Images carry a class-dependent pattern under noise, so a model can learn them."""
import bz2
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

ROOT = Path(__file__).resolve().parents[1]


def digit_images(labels, size, channels, rng):
    """Noise plus a bright bar whose position encodes the label: learnable, not trivially constant."""
    n = len(labels)
    x = rng.integers(0, 90, (n, size, size, channels))
    rows = 2 + (labels % 10) * (size - 6) // 10
    for i, r in enumerate(rows):
        x[i, r:r + 3, 4:size - 4] += 150
    return x.clip(0, 255).astype(np.uint8)


def write_svhn(path, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = digit_images(labels, 32, 3, rng).transpose(1, 2, 3, 0)  # official layout: 32 x 32 x 3 x N
    y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)  # official: digit 0 is label 10
    scipy.io.savemat(path, {"X": x, "y": y})
    return labels


def write_idx(path, array):
    magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
    with open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big"))
        for d in array.shape:
            f.write(int(d).to_bytes(4, "big"))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(raw, prefix, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    write_idx(raw / f"{prefix}-images-idx3-ubyte", digit_images(labels, 28, 1, rng)[..., 0])
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return labels


def write_usps(folder, n_train, n_test, seed):
    """torchvision's USPS files: one line per image, "label i:v ..." with label 1..10 and v in [-1, 1]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        labels = rng.integers(0, 10, n)
        x = digit_images(labels, 16, 1, rng)[..., 0].reshape(n, 256) / 255 * 2 - 1
        lines = [f"{c + 1} " + " ".join(f"{i + 1}:{v:.4f}" for i, v in enumerate(row)) for c, row in zip(labels, x)]
        with bz2.open(folder / name, "wt") as f:
            f.write("\n".join(lines) + "\n")


def write_mnistm(folder, n_train, n_test, seed, pngs=False):
    """MNIST-M as the npz this project reads (x uint8 N x 32 x 32 x 3, y), or as the release's PNG folders."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        x = digit_images(labels, 32, 3, rng)
        if not pngs:
            np.savez(folder / f"mnist_m_{split}.npz", x=x, y=labels)
            continue
        (folder / f"mnist_m_{split}").mkdir()
        for i, image in enumerate(x):
            Image.fromarray(image).save(folder / f"mnist_m_{split}" / f"{i:08d}.png")
        (folder / f"mnist_m_{split}_labels.txt").write_text("".join(f"{i:08d}.png {c}\n" for i, c in enumerate(labels)))


def make_data_dir(root, n_train=600, n_test=200, extra_domains=False):
    root.mkdir(parents=True, exist_ok=True)
    write_svhn(root / "train_32x32.mat", n_train, 1)
    write_svhn(root / "test_32x32.mat", n_test, 2)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_mnist(raw, "train", n_train, 3)
    write_mnist(raw, "t10k", n_test, 4)
    if extra_domains:
        write_usps(root / "USPS", n_train, n_test, 5)
        write_mnistm(root / "mnist_m", n_train, n_test, 6)
    return root


def pytest_addoption(parser):
    parser.addoption("--fp32", action="store_true",
                     help="compute in fp32 as on a CPU without native bf16 (AVX2 only), whatever this CPU has")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: subprocesses, torchrun, the bench; deselect with -m 'not slow'")


@pytest.fixture(autouse=True, scope="session")
def cpu_precision(request):
    """--fp32: `--amp auto` picks fp32 in this process, as it does on a laptop without native bf16."""
    if not request.config.getoption("--fp32"):
        yield
        return
    import common.lifecycle
    real = common.lifecycle.pick_precision
    patch = pytest.MonkeyPatch()
    patch.setattr(common.lifecycle, "pick_precision",
                  lambda amp, device: "fp32" if amp == "auto" and device.type == "cpu" else real(amp, device))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """SVHN and MNIST only: MNIST-M and USPS are absent, as on a machine that never fetched them."""
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def all_domains_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("all_domains"), n_train=300, n_test=100, extra_domains=True)


def train_in_memory(cfg):
    """cfg trained in fp32 on the CPU with the project's own verbs, nothing written: (model, data, progress)."""
    import torch
    from common.experiment import load_data, new_model
    from common.lifecycle import Trial, seed_everything
    from common.training import Progress, fit, make_optimizer, make_schedule
    seed_everything(cfg.seed)
    trial = Trial(cfg, None, None, torch.device("cpu"), "fp32")
    data = load_data(trial)
    model = new_model(trial, data)
    optimizer = make_optimizer(cfg, model)
    progress = fit(model, optimizer, make_schedule(cfg, optimizer, len(data.source_train[1]) // cfg.batch_size), cfg,
                   data.source_train, data.source_val, "fp32", Progress())
    return model, data, progress


@pytest.fixture(scope="session")
def trained(data_dir):
    """One small network trained once per session on the fixture's SVHN (fp32, 6 epochs of 320 images): the
    tests that need a model that has learned something share it. Tests that change it work on a copy."""
    from types import SimpleNamespace
    from common import Config
    cfg = Config(width=8, epochs=6, batch_size=32, train_subset=320, amp="off", data_dir=str(data_dir))
    model, data, progress = train_in_memory(cfg)
    return SimpleNamespace(cfg=cfg, model=model.eval(), data=data, progress=progress)


def run_script(script, *args, cwd=None, timeout=240):
    """Run a numbered script as a user would; returns the CompletedProcess (output captured)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)
