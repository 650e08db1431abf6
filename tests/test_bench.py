import json

import pytest
import torch

from common import Config
from common.bench import augment_baseline, main, train_steps
from common.models import resnet18
from common.train import to_input


def test_both_sides_see_the_same_images():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    identity = Config()  # zero strengths: both pipelines must return exactly the input images
    assert torch.allclose(augment_baseline(images, identity), to_input(images, identity, 0),
                          atol=1e-5)
    labels = torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    init = resnet18(width=8).state_dict()
    losses = []
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        model = resnet18(width=8)
        model.load_state_dict(init)
        losses.append(train_steps(model, images, labels, 4, precision, channels_last))
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0]  # same data and weights; only the arithmetic differs


def test_quick_bench_prints_every_row_and_writes_json(tmp_path, capsys):
    main(["--quick", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["augment", "train_step", "train_step_precision", "epoch", "eval", "memory"]
    for r in result["rows"]:
        assert r["baseline"] > 0 and r["ours"] > 0 and r["name"] in out
    memory = result["rows"][-1]
    assert abs(memory["ratio"] - memory["baseline"] / memory["ours"]) < 1e-9


@pytest.mark.parametrize("args, message", [(["--images", "0"], "--images must be >= 1"),
                                           (["--images", "64", "--batch-size", "128"], "must be at least --batch-size"),
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
