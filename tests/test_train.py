import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common import Config
from common import experiment
from common.data import Data, input_stats
from common.experiment import load_data, new_model
from common.lifecycle import Trial, pick_precision, seed_everything  # the real one, even under --fp32
from common.models import Normalize, StandardizeImage
from common.training import Diverged, Progress, evaluate, fit, loss_function, make_optimizer, make_schedule
from conftest import ROOT

SMALL = Config(width=8, epochs=8, batch_size=32, train_subset=256, lr=0.1, amp="off")


def bare_run(cfg):
    """A Run that writes nothing: for the verbs that only read and compute."""
    return Trial(cfg, out=None, staging=None, device=torch.device("cpu"), precision="fp32")


def train_small(data_dir, **changes):
    cfg = dataclasses.replace(SMALL, data_dir=str(data_dir), **changes)
    seed_everything(cfg.seed)
    run = bare_run(cfg)
    data = load_data(run)
    model = new_model(run, data)
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, len(data.source_train[1]) // cfg.batch_size)
    return fit(model, optimizer, schedule, cfg, data.source_train, data.source_val, "fp32", Progress())


def test_loss_falls_and_validation_improves_on_a_learnable_fixture(trained):
    progress = trained.progress
    assert len(progress.history) == 6 and len(progress.steps) == 6 * ((320 - 16) // 32)  # 16 of the 320 validate
    assert progress.history[-1]["train_loss"] < 0.7 * progress.history[0]["train_loss"]
    assert progress.best_val_acc > 0.5  # chance is 0.1
    best = max(h["val_acc"] for h in progress.history)
    assert progress.best_epoch == max(h["epoch"] for h in progress.history if h["val_acc"] == best)


def test_same_seed_gives_identical_history(data_dir):
    runs = [train_small(data_dir, epochs=1, seed=s, train_subset=128) for s in (1, 1, 2)]
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in p.history] for p in runs]
    assert strip[0] == strip[1] and runs[0].steps == runs[1].steps
    assert runs[0].steps != runs[2].steps


def test_label_smoothing_loss_is_pytorchs():
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    used = loss_function(Config(label_smoothing=0.1))(logits, target)
    assert torch.allclose(used, F.cross_entropy(logits, target, label_smoothing=0.1))
    manual = 0.9 * F.cross_entropy(logits, target) - 0.1 * F.log_softmax(logits, 1).mean()
    assert torch.allclose(used, manual, atol=1e-6)


def test_non_finite_loss_stops_with_epoch_and_step(data_dir):
    with pytest.raises(Diverged, match=r"epoch 1, step \d+.*lower --lr"):
        train_small(data_dir, norm="none", lr=1e12, weight_decay=0)


def test_precision_is_bf16_only_where_native(monkeypatch):
    import common.lifecycle as lifecycle
    from common import UserError
    cpu = torch.device("cpu")
    monkeypatch.setattr(lifecycle, "native_bf16", lambda device: False)
    assert pick_precision("auto", cpu) == "fp32" and pick_precision("off", cpu) == "fp32"
    with pytest.raises(UserError, match="--amp off"):
        pick_precision("bf16", cpu)
    monkeypatch.setattr(lifecycle, "native_bf16", lambda device: True)
    assert pick_precision("auto", cpu) == "bf16" and pick_precision("off", cpu) == "fp32"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faulting_buffers_in_every_step():
    # Its own process: the setting is process-wide and cannot be undone for the comparison.
    code = """
import resource, torch
from common.bench import STACK
from common.augment import augment
from common.plumbing import keep_freed_memory
images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
def faults_per_call():
    augment(images, STACK, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        augment(images, STACK, 0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
default = faults_per_call()
keep_freed_memory()
print(default, faults_per_call())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout
    default, kept = map(float, out.split())
    assert kept < default / 3, (default, kept)  # measured: ~7,000 -> ~200 per call


def split(value, n):
    return torch.full((n, 3, 32, 32), value, dtype=torch.uint8), torch.arange(n) % 10


def test_normalization_statistics_come_from_the_train_split_only():
    cfg = Config(width=8, amp="off")
    data = Data(source_train=split(51, 20), source_val=split(255, 20), test_sets={"svhn": split(200, 20)}, dev_sets={"mnist": split(0, 20)},
                skipped={})
    model = new_model(bare_run(cfg), data)
    normalize = next(m for m in model.modules() if isinstance(m, Normalize))
    assert torch.allclose(normalize.mean.flatten(), torch.full((3,), 0.2))  # 51 / 255: train alone
    assert normalize.mean.flatten().tolist() == pytest.approx(input_stats(data.source_train[0])[0])


@pytest.mark.parametrize("input_norm", ["image", "dataset"])
def test_a_fine_tuned_model_normalizes_as_its_source_network_with_its_own_datas_statistics(input_norm, tmp_path):
    source_cfg = Config(width=8, amp="off", input_norm=input_norm)
    mnist_like = Data(source_train=split(10, 20), source_val=None, test_sets={}, dev_sets={}, skipped={})
    source = new_model(bare_run(source_cfg), mnist_like)
    svhn_like = Data(source_train=split(102, 20), source_val=None, test_sets={}, dev_sets={}, skipped={})
    tuned = new_model(bare_run(source_cfg), svhn_like, ({"model": source.state_dict()}, tmp_path / "model.pt"))
    fronts = [m for m in tuned.modules() if isinstance(m, (Normalize, StandardizeImage))]
    if input_norm == "image":  # 07's recipe: no statistics to carry over, each image standardized by itself
        assert isinstance(fronts[0], StandardizeImage)
    else:
        assert torch.allclose(fronts[0].mean.flatten(), torch.full((3,), 0.4))  # 102 / 255: SVHN's, not MNIST's


class Recorder(torch.nn.Module):
    """Predicts class 0 and keeps every input it was shown."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(len(x), 10) + self.weight


def test_evaluation_uses_running_statistics_and_changes_no_buffer(trained):
    model = copy.deepcopy(trained.model).train()  # evaluate() must put it in eval mode itself
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = trained.data.test_sets["svhn"]
    _, accuracy, predictions = evaluate(model, x, y, "fp32")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # train mode would update them
    _, _, alone = evaluate(model, x[:5], y[:5], "fp32")  # an image's prediction does not depend on its batch
    assert torch.equal(alone, predictions[:5]) and accuracy > 0.5


def test_evaluation_is_never_augmented():
    heavy = Config(rotate=90, jitter=0.9, invert=0.9, prorandconv=0.9, randconv=0.9, amp="off")
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    data = Data(source_train=None, source_val=None, test_sets={"svhn": (images, torch.zeros(12, dtype=torch.long))},
                dev_sets={"mnist": (images, torch.arange(12) % 10)}, skipped={})
    run = bare_run(heavy)
    model = Recorder()
    run.progress.best_weights = model.state_dict()
    results = experiment.test(run, model, data)
    assert results["test"]["svhn"] == 1.0 and len(model.seen) == 2
    for seen in model.seen:
        assert torch.equal(seen, images.float() / 255)  # exactly the images: no augmentation draw at test time
