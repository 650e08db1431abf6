import numpy as np
import pytest
import scipy.io
import torch

from common import UserError, data
from conftest import write_idx, write_svhn


def test_svhn_shapes_dtypes_and_label_ten_is_zero(tmp_path):
    labels = write_svhn(tmp_path / "train_32x32.mat", 50, seed=0)
    x, y = data.load("svhn", "train", tmp_path)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert 0 in y.tolist() and y.max() <= 9
    raw = scipy.io.loadmat(tmp_path / "train_32x32.mat")["X"]
    assert torch.equal(x[7], torch.from_numpy(raw[..., 7]).permute(2, 0, 1))  # HWC-N -> N-CHW, no mixing


def test_mnist_becomes_3x32x32(data_dir):
    x, y = data.load("mnist", "test", data_dir)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2])  # grey copied to every channel
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))


def test_validation_split_disjoint_covering_and_stable():
    train, val = data.split_train_val(1000, 0.05)
    assert len(val) == 50 and len(train) == 950
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.equal(val, data.split_train_val(1000, 0.05)[1])


def test_stratified_subset_keeps_proportions():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([500, 300, 200])])
    chosen = data.stratified_subset(labels, 100, seed=1)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert torch.bincount(labels[chosen]).tolist() == [50, 30, 20]
    assert torch.equal(chosen, data.stratified_subset(labels, 100, seed=1))


def test_subset_larger_than_dataset_is_an_error():
    with pytest.raises(UserError, match="1000 requested but only 10"):
        data.stratified_subset(torch.arange(10) % 10, 1000)


@pytest.mark.parametrize("content, message", [
    (b"MATLAB 5.0 MAT-file, truncated", "not a readable .mat"),
    ({"images": np.zeros((32, 32, 3, 2), np.uint8)}, "lacks the keys"),
    ({"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))}, r"shape \(32, 32, 3, N\)"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [11]])}, "labels must lie in 1..10"),
])
def test_bad_svhn_file_names_file_and_fault(tmp_path, content, message):
    path = tmp_path / "test_32x32.mat"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        scipy.io.savemat(path, content)
    with pytest.raises(UserError, match=message) as error:
        data.load("svhn", "test", tmp_path)
    assert str(path) in str(error.value)


def test_bad_idx_files_are_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated") as error:
        data.load("mnist", "test", tmp_path)
    assert str(images) in str(error.value)
    write_idx(images, np.zeros((5, 28, 28), np.uint8))
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(UserError, match="magic number"):
        data.load("mnist", "test", tmp_path)


def test_missing_file_without_network_leaves_nothing_behind(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(data.torchvision.datasets, "SVHN", offline)
    with pytest.raises(UserError, match="train_32x32.mat") as error:
        data.load("svhn", "train", tmp_path)
    assert "--data-dir" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # no half-downloaded file posing as data


def test_usps_reads_torchvisions_files_as_mnist_is_shown(tmp_path):
    from conftest import write_usps
    write_usps(tmp_path / "USPS", 40, 20, seed=0)
    x, y = data.load("usps", "test", tmp_path)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and torch.equal(x[:, 0], x[:, 1])
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9  # the file's 1..10 is digit 0..9
    import torchvision
    raw = torchvision.datasets.USPS(tmp_path / "USPS", train=False)
    assert y.tolist() == list(raw.targets)
    assert abs(x[3, 0].float().mean() - raw.data[3].mean()) < 3  # resized, same brightness


def test_mnistm_reads_the_npz_and_the_release_png_layout_alike(tmp_path):
    from conftest import write_mnistm
    write_mnistm(tmp_path / "npz" / "mnist_m", 30, 12, seed=0)
    write_mnistm(tmp_path / "png" / "mnist_m", 30, 12, seed=0, pngs=True)
    x, y = data.load("mnistm", "test", tmp_path / "npz")
    arrays = np.load(tmp_path / "npz" / "mnist_m" / "mnist_m_test.npz")
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2)) and y.tolist() == arrays["y"].tolist()
    x_png, y_png = data.load("mnistm", "test", tmp_path / "png")
    assert torch.equal(x_png, x) and torch.equal(y_png, y)


def test_absent_optional_domains_are_none_and_the_study_pair_is_not(tmp_path):
    assert data.load("usps", "test", tmp_path) is None and data.load("mnistm", "train", tmp_path) is None
    with pytest.raises(UserError, match="train_32x32.mat"):
        data.load("svhn", "train", tmp_path / "nowhere")


def test_a_fifo_as_a_data_file_is_refused_not_waited_on(tmp_path):
    import os
    os.mkfifo(tmp_path / "test_32x32.mat")
    with pytest.raises(UserError, match="not a regular file"):
        data.load("svhn", "test", tmp_path)


def test_bad_mnistm_file_is_named(tmp_path):
    (tmp_path / "mnist_m").mkdir()
    np.savez(tmp_path / "mnist_m" / "mnist_m_test.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="mnist_m_test.npz is not an MNIST-M npz"):
        data.load("mnistm", "test", tmp_path)


def test_mnist_test_split_loads_without_the_train_files(data_dir, tmp_path):
    import shutil
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(data_dir / "MNIST" / "raw" / name, tmp_path / "MNIST" / "raw" / name)
    x, y = data.load("mnist", "test", tmp_path)
    reference = data.load("mnist", "test", data_dir)
    assert torch.equal(x, reference[0]) and torch.equal(y, reference[1])


def mnistm_pngs(root, labels_text, encoding="utf-8", size=32):
    """One PNG and a labels file in the release's layout; size=(w, h) forges the PNG header's dimensions instead
    (a decompression bomb: 10^10 pixels declared in a file of a few hundred bytes)."""
    import struct
    import zlib
    from PIL import Image
    folder = root / "mnist_m" / "mnist_m_test"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3) if isinstance(size, tuple) else (size, size, 3), np.uint8)).save(folder / "a.png")
    if isinstance(size, tuple):
        png = bytearray((folder / "a.png").read_bytes())
        png[16:24] = struct.pack(">II", *size)  # IHDR's width and height, then its CRC over type and data
        png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
        (folder / "a.png").write_bytes(bytes(png))
    (root / "mnist_m" / "mnist_m_test_labels.txt").write_text(labels_text, encoding=encoding)
    return root


def npz_declaring(root, n):
    """An MNIST-M npz whose x header declares n images but holds four (a garbled or hostile file)."""
    import zipfile
    (root / "mnist_m").mkdir()
    path = root / "mnist_m" / "mnist_m_test.npz"
    np.savez(path, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    shape = f"({n}, 32, 32, 3)".encode()
    grown = len(shape) - len(b"(4, 32, 32, 3)")  # taken from the header's padding: its declared length stays true
    members["x.npy"] = members["x.npy"].replace(b"(4, 32, 32, 3)", shape, 1).replace(b" " * grown + b"\n", b"\n", 1)
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    return root


@pytest.mark.parametrize("make, message", [
    (lambda d: mnistm_pngs(d, "../../secret.png 3\n"), "plain file names inside"),
    (lambda d: mnistm_pngs(d, "a.png ٣\n"), "ASCII digit"),
    (lambda d: mnistm_pngs(d, "a.png 3\n", encoding="utf-16"), "not UTF-8 text"),
    (lambda d: mnistm_pngs(d, "a.png 3\n", size=40), "40x40; MNIST-M images are 32x32"),
    (lambda d: (d / "mnist_m").mkdir() or (d / "mnist_m" / "mnist_m_test.npz").write_bytes(b"PK\x03\x04 cut short"),
     "not an MNIST-M npz"),
    (lambda d: npz_declaring(d, 10 ** 9), "not an MNIST-M npz"),
    (lambda d: mnistm_pngs(d, "a.png 3\n", size=(100_000, 100_000)), "not a readable image"),
])
def test_bad_mnistm_files_are_one_line_naming_the_fault(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message):
        data.load("mnistm", "test", tmp_path)


def test_mnistm_labels_as_a_column_load_as_a_vector(tmp_path):
    (tmp_path / "mnist_m").mkdir()
    np.savez(tmp_path / "mnist_m" / "mnist_m_test.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4).reshape(4, 1))
    assert data.load("mnistm", "test", tmp_path)[1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("line, message", [("3 " + " ".join(f"{i}:0.5" for i in range(1, 200)), "has 199 values"),
                                           ("3 " + " ".join(f"{i}:1.5" for i in range(1, 257)), r"in \[-1, 1\]"),
                                           ("3 " + " ".join(f"{i}:nan" for i in range(1, 257)), "NaN")])
def test_usps_lines_are_checked_before_any_training(tmp_path, line, message):
    import bz2
    (tmp_path / "USPS").mkdir()
    with bz2.open(tmp_path / "USPS" / "usps.t.bz2", "wt") as f:
        f.write(line + "\n")
    with pytest.raises(UserError, match=message):
        data.load("usps", "test", tmp_path)


def test_a_dev_domain_whose_train_file_is_missing_is_named_not_dropped(all_domains_dir, tmp_path, capsys):
    import shutil
    shutil.copytree(all_domains_dir, tmp_path / "d")
    (tmp_path / "d" / "USPS" / "usps.bz2").unlink()  # USPS test present, its train file (a dev set) absent
    from common import Config
    tests, dev, skipped = data.load_domains(Config(dataset="mnist", data_dir=str(tmp_path / "d"), eval_subset=8), "cpu")
    assert "usps" in tests and "usps" not in dev and "dev_usps" in skipped
    assert "dev set USPS" in capsys.readouterr().out


def test_an_image_linked_from_outside_the_mnistm_folder_is_refused(tmp_path):
    from PIL import Image
    root = mnistm_pngs(tmp_path, "b.png 3\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "secret.png")
    (root / "mnist_m" / "mnist_m_test" / "b.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UserError, match="lies outside"):
        data.load("mnistm", "test", root)
