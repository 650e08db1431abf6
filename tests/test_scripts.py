"""Every numbered script end to end, as a user runs it, on fixture files."""
import importlib.util
import json
import sys
import time

import pytest
import torch
import torchvision

from common import Config, cli, launch, run
from conftest import ROOT, run_script

SCRIPTS = sorted(p.name for p in ROOT.glob("[0-9][0-9]_*.py"))
METRIC_KEYS = {"status", "config", "history", "steps", "test", "best_epoch", "best_val_acc", "python", "torch",
               "torchvision", "device", "device_name", "precision", "git_commit", "wall_time_s", "confusion"}


LAYOUT = ("01_base.py", "02_no_bn.py", "03_label_smoothing.py", "04_augmentation.py", "05_transfer.py", "06_adam.py",
          "07_reverse_mnist.py", "08_finetune_svhn.py")  # the writeup's experiments; more scripts may follow


def test_the_writeups_scripts_exist_and_every_script_is_named_by_its_file():
    assert set(LAYOUT) <= set(SCRIPTS)
    for script in SCRIPTS:
        spec = importlib.util.spec_from_file_location(script[:-3], ROOT / script)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.CONFIG.name == script[:-3]
        assert module.__doc__.count("\n") >= 3  # the question and the difference from 01


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A random ResNet-18 state dict where torchvision's cache looks for the ImageNet weights."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    return home


def run_in_process(script, *args):
    """A numbered script as `python NN_x.py args` runs it, in this process (no interpreter start per script;
    tests/test_reliability.py and the ones below run them as subprocesses)."""
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = cli(module.CONFIG, [str(a) for a in args])
    launch(module.main, cfg) if hasattr(module, "main") else run(cfg)


def test_a_run_says_what_it_is_in_a_few_lines_then_one_line_per_epoch(data_dir, tmp_path, capsys):
    run_in_process("01_base.py", "--quick", "--width", "8", "--data-dir", data_dir, "--results-dir", tmp_path)
    out = capsys.readouterr().out.splitlines()
    first_epoch = next(i for i, line in enumerate(out) if line.startswith("epoch 1/1 |"))
    assert first_epoch <= 5 and out[0].startswith("01_base, seed 0: data ")  # the config: what differs from 01
    assert "width=8" in out[1] and "lr=" not in " ".join(out[:first_epoch])  # 01's own defaults are not repeated


@pytest.mark.parametrize("script", ["01_base.py", "07_reverse_mnist.py"])
def test_tta_is_reported_by_every_procedure(script, data_dir, tmp_path):
    run_in_process(script, "--quick", "--width", "8", "--tta", "bn", "--data-dir", data_dir, "--results-dir", tmp_path)
    metrics = json.loads((tmp_path / "quick" / script[:-3] / "seed-0" / "metrics.json").read_text())
    target = "svhn" if script.startswith("07") else "mnist"
    assert set(metrics["test_tta"]) == {"bn"} and 0 <= metrics["test_tta"]["bn"][target] <= 1


def test_a_blind_run_writes_its_test_row_to_metrics_only(data_dir, tmp_path, capsys, monkeypatch):
    titles = []
    monkeypatch.setattr("common.experiment.plot_confusion", lambda matrix, title, path: titles.append(title))
    run_in_process("07_reverse_mnist.py", "--quick", "--width", "8", "--tta", "bn", "--blind", "--data-dir", data_dir,
                   "--results-dir", tmp_path)
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "quick" / "07_reverse_mnist" / "seed-0" / "metrics.json").read_text())
    assert 0 <= metrics["test"]["svhn"] <= 1 and 0 <= metrics["test_tta"]["bn"]["svhn"] <= 1
    assert "SVHN" not in out and "%" not in " ".join(titles) and titles  # the log's test rows name SVHN
    with pytest.raises(SystemExit):  # --evaluate prints what it tests; --dev-only is its way to leave them out
        cli(Config(), ["--blind", "--evaluate", str(tmp_path / "model.pt")])


@pytest.mark.slow
def test_every_script_quick_end_to_end_then_report(data_dir, tmp_path, torch_home, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for script in SCRIPTS:
        run_in_process(script, "--quick", "--width", "16", "--data-dir", data_dir, "--results-dir", tmp_path)
        out = tmp_path / "quick" / script[:-3] / "seed-0"
        metrics = json.loads((out / "metrics.json").read_text())
        assert METRIC_KEYS <= set(metrics) and metrics["status"] == "finished"
        assert set(metrics["test"]) == {"svhn", "mnist"} and set(metrics["skipped_domains"]) == {"mnistm", "usps"}
        assert metrics["config"]["epochs"] == 1 and metrics["labels_used"] == 256
        assert metrics["data"]["train"] + metrics["data"]["val"] == 256  # the validation split comes out of the budget
        train, batch = metrics["data"]["train"], metrics["config"]["batch_size"]
        assert len(metrics["steps"]) == train // min(batch, train) and len(metrics["history"]) == 1
        for png in ("loss.png", "accuracy.png", f"confusion_{'svhn' if script.startswith('07') else 'mnist'}.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert not out.with_name("seed-0.partial").exists()
    assert (tmp_path / "quick" / "04_augmentation" / "seed-0" / "augmented.png").exists()
    reverse = json.loads((tmp_path / "quick" / "07_reverse_mnist" / "seed-0" / "metrics.json").read_text())
    assert reverse["config"]["dataset"] == "mnist" and reverse["inherited_from"] is None  # its own recipe
    finetune = json.loads((tmp_path / "quick" / "08_finetune_svhn" / "seed-0" / "metrics.json").read_text())
    assert finetune["init_from"].endswith("07_reverse_mnist/seed-0/model.pt")

    capsys.readouterr()
    run_in_process("08_finetune_svhn.py", "--quick", "--sweep", "--sweep-sizes", "32,100000,32", "--data-dir", data_dir,
                   "--results-dir", tmp_path)
    assert "skipping sizes above" in capsys.readouterr().out
    swept = tmp_path / "quick" / "08_finetune_svhn" / "sweep" / "seed-0"  # beside the sweep's runs, not in 08's set
    sweep = json.loads((swept / "sweep.json").read_text())
    assert [(r["labels"], r["start"]) for r in sweep["rows"]] == [(32, "fine-tuned"), (32, "scratch")]  # once each
    assert (swept / "label_efficiency.png").exists()
    assert [r["labels_used"] for r in sweep["rows"]] == [32, 32]  # validation inside the budget
    arms = {start: json.loads((tmp_path / "quick" / "08_finetune_svhn" / "sweep" / f"{start}-32" / "seed-0" /
                               "metrics.json").read_text())["config"] for start in ("fine-tuned", "scratch")}
    built = reverse["config"]
    for field in ("arch", "norm", "input_norm", "width", "transfer_input"):  # one network: only the start differs
        assert arms["fine-tuned"][field] == arms["scratch"][field] == built[field], field
    assert arms["scratch"]["lr"] == arms["scratch"]["scratch_lr"] != arms["fine-tuned"]["lr"]
    assert arms["scratch"]["epochs"] == 1 and arms["scratch"]["eval_subset"] == 256  # --quick's profile, not 30 epochs

    from common.report import main
    main(["--results-dir", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    for script in SCRIPTS:
        assert f"| {script[:-3]} |" in summary


@pytest.mark.slow
def test_missing_data_fails_fast_naming_the_file(tmp_path):
    start = time.time()
    done = run_script("01_base.py", "--data-dir", tmp_path / "empty", "--results-dir", tmp_path / "r")
    assert done.returncode != 0 and time.time() - start < 30
    assert "train_32x32.mat" in done.stderr and "--data-dir" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3
    assert not list((tmp_path / "empty").glob("*.mat"))


@pytest.mark.slow
def test_08_without_07_and_05_without_weights_fail_cleanly(data_dir, tmp_path, monkeypatch):
    done = run_script("08_finetune_svhn.py", "--quick", "--data-dir", data_dir, "--results-dir", tmp_path)
    assert done.returncode == 1 and "run `python 07_reverse_mnist.py --quick --seed 0` first" in done.stderr
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_cache"))
    done = run_script("05_transfer.py", "--quick", "--data-dir", data_dir, "--results-dir", tmp_path)
    assert done.returncode == 1 and "resnet18-f37072fd.pth" in done.stderr and "--weights PATH" in done.stderr
    assert "Traceback" not in done.stderr
