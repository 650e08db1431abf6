"""Hostile input and faults, one category per test: a clear line and a non-zero exit, or the right result;
nothing finished ever lost or mixed."""
import dataclasses
import fcntl
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.io
import torch

from common import Config, UserError, data, run
from common.training import one_cycle
from conftest import ROOT, run_script

SMALL = Config(width=8, epochs=1, train_subset=64, eval_subset=32)


def small(data_dir, results_dir, **changes):
    return dataclasses.replace(SMALL, data_dir=str(data_dir), results_dir=str(results_dir), **changes)


def one_line_exit(cfg):
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("labels, message", [
    (np.array([[1.0], [np.nan], [3.0]]), "NaN, infinite or fractional"),
    (np.array([[1.0], [2.5], [3.0]]), "NaN, infinite or fractional"),
    (np.array([[1], [2], [0]]), "must lie in 1..10"),
])
def test_labels_must_be_finite_integers_in_range(tmp_path, split, labels, message):
    path = tmp_path / f"{split}_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": labels})
    with pytest.raises(UserError, match=message) as error:
        data.load("svhn", split, tmp_path)
    assert str(path) in str(error.value)


def test_file_system_faults_are_named_not_called_corrupt(tmp_path):
    a_file = tmp_path / "data_file"
    a_file.write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        data.load("svhn", "train", a_file)
    (tmp_path / "d" / "train_32x32.mat").mkdir(parents=True)  # unreadable as a file
    with pytest.raises(UserError, match="train_32x32.mat is not a regular file") as error:
        data.load("svhn", "train", tmp_path / "d")
    assert "Delete" not in str(error.value)


def test_schedule_is_valid_for_any_number_of_steps(data_dir, tmp_path):
    for total in (1, 2, 3, 5, 7, 100):
        for warmup in (0.2, 0.5, 0.99):
            lrs = [one_cycle(step, total, warmup) for step in range(total + 1)]
            assert all(0 < lr <= 1 for lr in lrs) and max(lrs) == 1.0, (total, warmup)
    # Five steps in all at warm-up 0.2 once divided by zero inside OneCycleLR.
    run(small(data_dir, tmp_path, epochs=5))
    assert json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())["status"] == "finished"


def test_a_finite_blow_up_is_divergence_and_keeps_the_good_result(data_dir, tmp_path):
    cfg = small(data_dir, tmp_path)
    run(cfg)
    good = (tmp_path / "01_base/seed-0/metrics.json").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        run(dataclasses.replace(cfg, lr=1e6, epochs=2))
    assert exit_.value.code == 3
    assert (tmp_path / "01_base/seed-0/metrics.json").read_bytes() == good
    staged = json.loads((tmp_path / "01_base/seed-0.partial/metrics.json").read_text())  # valid JSON, no bare NaN
    assert staged["status"] == "diverged"


def test_saved_epochs_are_never_discarded_unasked(data_dir, tmp_path):
    cfg = small(data_dir, tmp_path, epochs=2)
    staging = tmp_path / "01_base/seed-0.partial"
    from common.lifecycle import save_checkpoint
    from common.training import Progress
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    staging.mkdir(parents=True)
    save_checkpoint(staging / "checkpoint.pt", cfg, model, optimizer,
                    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.amp.GradScaler("cpu"),
                    Progress(epoch=1), {})
    saved = (staging / "checkpoint.pt").read_bytes()
    assert "--resume to continue it, or --restart" in one_line_exit(cfg)
    assert (staging / "checkpoint.pt").read_bytes() == saved
    run(dataclasses.replace(cfg, restart=True))  # asked: discarded and run afresh
    assert json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_files_missing_keys_are_one_line_errors(data_dir, tmp_path):
    cfg = small(data_dir, tmp_path)
    staging = tmp_path / "01_base/seed-0.partial"
    staging.mkdir(parents=True)
    torch.save({"config": dataclasses.asdict(cfg), "model": {}}, staging / "checkpoint.pt")
    assert "lacks optimizer" in one_line_exit(dataclasses.replace(cfg, resume=True))
    torch.save(["not", "a", "dict"], staging / "checkpoint.pt")
    assert "not one of this project's files" in one_line_exit(dataclasses.replace(cfg, resume=True))
    source = tmp_path / "07_reverse_mnist/seed-0/model.pt"
    source.parent.mkdir(parents=True)
    torch.save({"model": {}}, source)
    done = run_script("08_finetune_svhn.py", "--width", "8", "--epochs", "1", "--data-dir", data_dir,
                      "--results-dir", tmp_path)
    assert done.returncode == 1 and "lacks the model or its config" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_08_refuses_network_flags_that_conflict_with_07s_model(data_dir, tmp_path):
    from test_scripts import run_in_process
    run(small(data_dir, tmp_path, name="07_reverse_mnist", dataset="mnist", input_norm="image"))
    args = ["--epochs", "1", "--subset-size", "64", "--eval-subset", "32", "--data-dir", data_dir, "--results-dir", tmp_path]
    with pytest.raises(SystemExit) as exit_:
        run_in_process("08_finetune_svhn.py", "--width", "16", *args)
    assert "drop --width 16 (the model has 8)" in str(exit_.value.code)
    run_in_process("08_finetune_svhn.py", *args)  # not passed: 07's network is taken, and metrics.json says so
    built = json.loads((tmp_path / "08_finetune_svhn/seed-0/metrics.json").read_text())["config"]
    assert (built["width"], built["input_norm"]) == (8, "image")


@pytest.mark.slow
def test_a_second_run_of_the_same_folder_is_refused(data_dir, tmp_path):
    lock = tmp_path / "quick" / "01_base" / "seed-0.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as held:  # as a running first run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        done = run_script("01_base.py", "--quick", "--width", "8", "--data-dir", data_dir, "--results-dir", tmp_path)
    assert done.returncode == 1 and "another run is writing" in done.stderr and "4242" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_output_files_respect_the_umask(data_dir, tmp_path):
    code = (f"import os; os.umask(0o022); from common import Config, run; "
            f"run(Config(width=8, epochs=1, train_subset=64, eval_subset=32, data_dir={str(data_dir)!r}, "
            f"results_dir={str(tmp_path)!r}))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=120)
    for path in (tmp_path / "01_base/seed-0").iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_bench_output_path_is_checked_before_the_work(tmp_path):
    from common.bench import main
    (tmp_path / "file").write_text("")
    started = time.time()
    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--json", str(tmp_path / "file" / "bench.json")])
    assert str(exit_.value.code).startswith("error: cannot write") and time.time() - started < 5


def test_a_finite_validation_spike_is_not_divergence(data_dir, tmp_path, monkeypatch):
    # Seen on 554 SVHN images: early BN statistics put the validation loss near 2,000; the run recovers.
    import common.training as train
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (2000.0, *real(*a, **k)[1:]))
    run(small(data_dir, tmp_path, epochs=2))
    history = json.loads((tmp_path / "01_base/seed-0/metrics.json").read_text())["history"]
    assert [h["val_loss"] for h in history] == [2000.0, 2000.0]
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (9e34, *real(*a, **k)[1:]))  # --lr 1e6 once gave this
    with pytest.raises(SystemExit) as exit_:
        run(small(data_dir, tmp_path, epochs=2, restart=True))
    assert exit_.value.code == 3


def test_quick_keeps_the_sizes_and_epochs_passed_on_the_command_line():
    from common import cli
    from common.lifecycle import resolve
    assert (resolve(cli(Config(), ["--quick"])).epochs, resolve(cli(Config(), ["--quick"])).train_subset) == (1, 256)
    explicit = resolve(cli(Config(), ["--quick", "--epochs", "3", "--train-subset", "100"]))
    assert (explicit.epochs, explicit.train_subset, explicit.eval_subset) == (3, 100, 256)


def test_a_symlinked_seed_folder_is_written_through_and_kept(data_dir, tmp_path):
    elsewhere = tmp_path / "other_disk" / "seed-0"
    elsewhere.mkdir(parents=True)
    link = tmp_path / "results" / "01_base" / "seed-0"
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    for lr in (0.1, 0.05):  # twice: the second replaces the first's set, through the link
        run(small(data_dir, tmp_path / "results", lr=lr))
        assert link.is_symlink() and json.loads((elsewhere / "metrics.json").read_text())["config"]["lr"] == lr


def test_resume_refuses_another_process_count_or_other_images(data_dir, tmp_path):
    from common.lifecycle import save_checkpoint
    from common.training import Progress
    cfg = small(data_dir, tmp_path, epochs=2, resume=True)
    staging = tmp_path / "01_base/seed-0.partial"
    staging.mkdir(parents=True)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for context, message in ((dict(world_size=2, data="?"), "saved by 2 process(es), this is 1: resume with torchrun"),
                             (dict(world_size=1, data="57:1:2"), "trained on other images than --data-dir now holds")):
        save_checkpoint(staging / "checkpoint.pt", dataclasses.replace(cfg, resume=False), model, optimizer,
                        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.amp.GradScaler("cpu"),
                        Progress(epoch=1), context)
        assert message in one_line_exit(cfg)


def test_a_full_disk_during_torch_save_is_one_line_and_recorded(data_dir, tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0")
    monkeypatch.setattr(torch, "save", full)
    message = one_line_exit(small(data_dir, tmp_path, epochs=2))
    assert "writing failed" in message and "checkpoint.pt" in message
    assert json.loads((tmp_path / "01_base/seed-0.partial/metrics.json").read_text())["status"] == "failed"


def test_fifo_or_garbled_model_files_are_refused_in_one_line(data_dir, tmp_path):
    import os
    from common.experiment import load_run_model, network_of
    cfg = small(data_dir, tmp_path)
    source = tmp_path / "07_reverse_mnist/seed-0/model.pt"
    source.parent.mkdir(parents=True)
    os.mkfifo(source)
    with pytest.raises(UserError, match="model.pt is not a regular file"):
        load_run_model("07_reverse_mnist", cfg)
    source.unlink()
    torch.save(dict(model={}, config=dict(arch="resnet18", norm="batch", input_norm="dataset", width=0,
                                          transfer_input="upsample64")), source)
    with pytest.raises(UserError, match=r"model.pt holds a network this project cannot build \(--width must be > 0"):
        network_of(cfg, load_run_model("07_reverse_mnist", cfg))
    os.mkfifo(tmp_path / "weights.pth")
    with pytest.raises(UserError, match="weights.pth is not a regular file"):
        from common.models import imagenet_weights_file
        imagenet_weights_file(str(tmp_path / "weights.pth"))


@pytest.mark.parametrize("init_from, message", [("08_finetune_svhn", "this run's own experiment"),
                                                ("../elsewhere", "must name an experiment")])
def test_08_never_starts_from_its_own_model_or_outside_the_results(init_from, message, capsys):
    import importlib.util
    import sys
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("finetune_svhn", ROOT / "08_finetune_svhn.py")
    script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.cli(script.CONFIG, ["--init-from", init_from])
    assert message in capsys.readouterr().err
