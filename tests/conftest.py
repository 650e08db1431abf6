"""Fixtures written in the real file formats (SVHN .mat via scipy, MNIST IDX), so the tests run the
real loading code. Images carry a class-dependent pattern under noise, so a model can learn them."""
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


def make_data_dir(root, n_train=600, n_test=200):
    root.mkdir(parents=True, exist_ok=True)
    write_svhn(root / "train_32x32.mat", n_train, 1)
    write_svhn(root / "test_32x32.mat", n_test, 2)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_mnist(raw, "train", n_train, 3)
    write_mnist(raw, "t10k", n_test, 4)
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"))


def run_script(script, *args, cwd=None, timeout=240):
    """Run a numbered script as a user would; returns the CompletedProcess (output captured)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)
