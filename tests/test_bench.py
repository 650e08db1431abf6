import json

import pytest
import torch

from common import Config
import torchvision.transforms as T
from torchvision.transforms import v2

from common.bench import STACK, main, train_steps, v2_transform
from common.models import resnet18
from common.training import to_input


def test_both_sides_see_the_same_images():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    identity = Config()  # zero strengths: every pipeline must return exactly the input images
    conventional = v2.Compose([v2.RandomAffine(0), v2.ToDtype(torch.float32, scale=True)])
    ours = to_input(images, identity, 0)
    assert torch.allclose(torch.stack([conventional(img) for img in images]), ours, atol=1e-5)
    assert torch.allclose(torch.stack([T.Compose([T.ToPILImage(), T.ToTensor()])(img) for img in images]), ours, atol=1e-5)
    out = torch.stack([v2_transform(STACK)(img) for img in images])  # 04's stack in v2 keeps shape, dtype, range
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    labels = torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    init = resnet18(width=8).state_dict()
    losses = []
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        model = resnet18(width=8)
        model.load_state_dict(init)
        losses.append(train_steps(model, images, labels, 4, precision, channels_last))
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0]  # same data and weights; only the arithmetic differs


@pytest.mark.slow
def test_quick_bench_prints_every_row_and_writes_json(tmp_path, capsys):
    main(["--quick", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["augment", "augment_writeup", "augment_dg", "deformable_conv", "train_step", "train_step_allocator", "epoch", "epoch_precision",
                     "epoch_writeup", "eval", "memory"]
    for r in result["rows"]:
        assert r["baseline"] > 0 and r["ours"] > 0 and r["name"] in out
        if r["unit"] == "images/s":  # per-core figures divide by the cores both sides had
            assert abs(r["ours_per_core"] * result["cores"] - r["ours"]) < 1e-6
    memory = result["rows"][-1]
    assert abs(memory["ratio"] - memory["baseline"] / memory["ours"]) < 1e-9
    assert "uint8" in memory["detail"] and memory["baseline"] < 2 * memory["ours"]  # uint8 against uint8
    assert 0 < result["dg_augment_share_of_train_step"] and "of a train step's time" in out
    assert "other processes used" in out and result["others_load_before"] is not None
    assert 3.0 < result["flops_g"]["imagenet_resnet18 upsample224 (05)"] / result["flops_g"]["imagenet_resnet18 upsample64 (05)"] < 3.4


@pytest.mark.parametrize("args, message", [(["--images", "0"], "--images must be >= 1"),
                                           (["--images", "64", "--batch-size", "128"], "must be at least --batch-size"),
                                           (["--quick", "--images", "16"], "must be at least --batch-size 32"),
                                           (["--images", "10000000"], "at most 100,000"),
                                           (["--device", "gpu"], "invalid choice")])
def test_bad_flags_exit_2_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cuda", "--quick"])
    assert exit_.value.code == "error: --device cuda requested but torch sees no CUDA device"
