"""The study's numbers mean what their labels say: label budgets, seeded subsets, comparable recipes,
controls, finished sets."""
import dataclasses
import importlib.util
import json
import sys
from contextlib import nullcontext

import pytest
import torch

from common import Config, UserError, cli, launch, run
from conftest import ROOT
from common.data import labelled_split
from common.models import StandardizeImage, build_model, flops_per_image
from common.results import best_recipe


def test_train_subset_is_the_whole_label_budget_and_seeds_resample_it():
    labels = torch.arange(5000) % 10
    cfg = Config(train_subset=1000)
    train, val = labelled_split(labels, cfg)
    assert len(train) + len(val) == 1000 and len(val) == 50  # validation carved out of the 1,000
    assert set(train.tolist()).isdisjoint(val.tolist())
    again, _ = labelled_split(labels, cfg)
    other, _ = labelled_split(labels, dataclasses.replace(cfg, seed=1))
    assert torch.equal(train, again) and set(train.tolist()) != set(other.tolist())
    full_train, full_val = labelled_split(labels, Config())  # no subset: the fixed 5% of the file
    assert torch.equal(full_val, labelled_split(labels, Config(seed=3))[1])


def test_finished_run_records_labels_used(data_dir, tmp_path):
    run(Config(width=8, epochs=1, train_subset=100, data_dir=str(data_dir), results_dir=str(tmp_path)))
    metrics = json.loads((tmp_path / "01_base" / "seed-0" / "metrics.json").read_text())
    assert metrics["labels_used"] == 100 == metrics["data"]["train"] + metrics["data"]["val"]


def finished(root, name, seed, val_acc, **config):
    path = root / name / f"seed-{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(dataclasses.asdict(Config(name=name, seed=seed)), **config)
    path.write_text(json.dumps(dict(status="finished", config=config, test=dict(svhn=0.5, mnist=0.5), data={},
                                    best_val_acc=val_acc, wall_time_s=1.0, device_name="cpu", precision="fp32")))


def test_best_recipe_ranks_comparable_runs_on_shared_seeds(tmp_path):
    finished(tmp_path, "01_base", 0, 0.90)
    finished(tmp_path, "01_base", 1, 0.90)
    finished(tmp_path, "03_label_smoothing", 0, 0.93, label_smoothing=0.1)
    finished(tmp_path, "03_label_smoothing", 2, 0.50, label_smoothing=0.1)  # no competitor has seed 2
    recipe, why = best_recipe(Config(name="07_reverse_mnist", results_dir=str(tmp_path)))
    assert recipe["label_smoothing"] == 0.1 and "03_label_smoothing" in why and "seeds [0]" in why


def test_best_recipe_refuses_incomparable_runs(tmp_path):
    finished(tmp_path, "01_base", 0, 0.90)
    finished(tmp_path, "04_augmentation", 0, 0.99, train_subset=500, rotate=15.0)
    with pytest.raises(UserError, match="not comparable.*train_subset=500"):
        best_recipe(Config(name="07_reverse_mnist", results_dir=str(tmp_path)))
    reverse = script("07_reverse_mnist.py")
    with pytest.raises(SystemExit) as exit_:  # 07 --inherit-best: the one-line error, exit 1, before any training
        launch(reverse.main, cli(reverse.CONFIG, ["--inherit-best", "--results-dir", str(tmp_path)]))
    assert str(exit_.value.code).startswith("error: --inherit-best: the finished 01-06 runs")


def script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / name)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # as `python 07_...py` has it
    spec.loader.exec_module(module)
    return module


def test_07_trains_its_own_recipe_whatever_results_holds_and_inherits_only_when_asked(tmp_path, monkeypatch, capsys):
    reverse = script("07_reverse_mnist.py")
    started = []
    monkeypatch.setattr(reverse, "start", lambda cfg, **provenance: started.append((cfg, provenance)) or nullcontext())
    monkeypatch.setattr(reverse, "load_data", lambda run: (_ for _ in ()).throw(SystemExit("stop here")))
    argv = ["--results-dir", str(tmp_path)]
    for _ in range(2):  # results/ empty, then holding a better 01-06 run
        with pytest.raises(SystemExit):
            reverse.main(cli(reverse.CONFIG, argv))
        finished(tmp_path, "03_label_smoothing", 0, 0.93, label_smoothing=0.3, lr=0.05)
    assert started[0][0] == started[1][0] and started[0][0].lr == 0.1 and started[0][0].label_smoothing == 0.1
    with pytest.raises(SystemExit):
        reverse.main(cli(reverse.CONFIG, argv + ["--inherit-best", "--lr", "0.07"]))
    inherited, provenance = started[2]
    assert inherited.label_smoothing == 0.3 and inherited.lr == 0.07  # taken, but a passed flag still wins
    assert "03_label_smoothing" in provenance["inherited_from"]["why"] and "--inherit-best" in capsys.readouterr().out


def test_imagenet_network_keeps_per_image_standardization():
    model = build_model(Config(arch="imagenet_resnet18", input_norm="image"), [0.5] * 3, [0.2] * 3, pretrained=False)
    assert isinstance(model[0], StandardizeImage)


def test_flops_counted_for_each_transfer_input():
    ours = flops_per_image(build_model(Config(), [0.5] * 3, [0.2] * 3))
    counts = {t: flops_per_image(build_model(Config(arch="imagenet_resnet18", transfer_input=t), [0.5] * 3, [0.2] * 3,
                                             pretrained=False)) for t in ("upsample64", "upsample224", "stem3x3")}
    assert abs(counts["upsample64"] / ours - 1) < 0.05  # the same compute as 01's network
    assert 3.0 < counts["upsample224"] / counts["upsample64"] < 3.4  # 3.2x, not the 49x once claimed


def test_pretrained_control_needs_no_weights(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    cfg = Config(name="05_transfer", arch="imagenet_resnet18", pretrained=False, transfer_input="stem3x3", epochs=1,
                 train_subset=64, eval_subset=32, data_dir=str(data_dir), results_dir=str(tmp_path))
    run(cfg)
    assert json.loads((tmp_path / "05_transfer" / "seed-0" / "metrics.json").read_text())["config"]["pretrained"] is False


def test_a_crash_before_metrics_json_leaves_the_old_set_whole(data_dir, tmp_path, monkeypatch):
    cfg = Config(width=8, epochs=1, train_subset=64, eval_subset=32, data_dir=str(data_dir), results_dir=str(tmp_path))
    run(cfg)
    out = tmp_path / "01_base" / "seed-0"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import common.experiment as experiment
    real_write = experiment.write_json

    def disk_full_at_the_end(path, obj):
        if obj.get("status") == "finished":
            raise OSError(28, "No space left on device", str(path))
        real_write(path, obj)
    monkeypatch.setattr(experiment, "write_json", disk_full_at_the_end)
    with pytest.raises(SystemExit) as exit_:
        run(dataclasses.replace(cfg, seed=0, lr=0.05, restart=True))
    assert str(exit_.value.code).startswith("error: No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the new PNGs and model.pt did not land


def test_an_interrupted_swap_is_completed_or_undone(tmp_path):
    from common.plumbing import recover_swap
    out = tmp_path / "seed-0"
    for state in ("finished", "running"):
        (tmp_path / "seed-0.old").mkdir()
        (tmp_path / "seed-0.old" / "metrics.json").write_text('{"config": {}, "status": "finished", "old": 1}')
        staging = tmp_path / "seed-0.partial"
        staging.mkdir()
        (staging / "metrics.json").write_text(json.dumps(dict(
            status=state, config={}, test=dict(svhn=0.5, mnist=0.5), data={}, best_val_acc=0.5, wall_time_s=1.0,
            device_name="cpu", precision="fp32")))
        recover_swap(out)  # crashed between the two renames: seed-0 missing
        kept = json.loads((out / "metrics.json").read_text())
        assert kept.get("old") if state == "running" else kept["status"] == "finished" and "old" not in kept
        assert not (tmp_path / "seed-0.old").exists()
        import shutil
        shutil.rmtree(out)
        shutil.rmtree(staging, ignore_errors=True)


def test_inherit_best_blames_the_odd_run_it_read_not_a_flag(tmp_path):
    finished(tmp_path, "03_label_smoothing", 0, 0.93, label_smoothing=7.0)  # not a valid recipe
    reverse = script("07_reverse_mnist.py")
    with pytest.raises(UserError, match="--inherit-best: the recipe it would take is not valid.*03_label_smoothing"):
        reverse.inherit_best(dataclasses.replace(reverse.CONFIG, inherit_best=True, results_dir=str(tmp_path)))
