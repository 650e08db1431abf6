"""Nothing lost, nothing half-written: kill and resume, Ctrl-C, divergence, bad input."""
import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest

from common import Config, run
from conftest import ROOT

RUN = ["--width", "32", "--epochs", "4", "--train-subset", "256", "--eval-subset", "64", "--batch-size", "64"]
COMPARED = ("history", "steps", "test", "best_epoch", "best_val_acc", "confusion")


def start(data_dir, results_dir, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "01_base.py"), *RUN, "--data-dir", str(data_dir),
                             "--results-dir", str(results_dir), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_first_epoch(partial, process, timeout=120):
    """Block until epoch 1 is checkpointed; return how long that epoch took."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            history = json.loads((partial / "metrics.json").read_text())["history"]
            if history and (partial / "checkpoint.pt").exists():
                return history[0]["seconds"]
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise TimeoutError


def comparable(path):
    metrics = json.loads(path.read_text())
    for record in metrics["history"]:
        record.pop("seconds")
    return {k: metrics[k] for k in COMPARED}


@pytest.mark.slow
def test_killed_rerun_keeps_old_results_and_resume_equals_uninterrupted(data_dir, tmp_path):
    out = tmp_path / "quiet" / "01_base" / "seed-0"
    first = start(data_dir, tmp_path / "quiet")
    assert first.wait(timeout=240) == 0, first.stderr.read()
    finished = {p: (out / p).read_bytes() for p in ("metrics.json", "loss.png", "accuracy.png")}

    rerun = start(data_dir, tmp_path / "quiet")
    epoch_seconds = wait_for_first_epoch(out.with_name("seed-0.partial"), rerun)
    time.sleep(epoch_seconds / 2)  # into the middle of epoch 2
    rerun.send_signal(signal.SIGKILL)
    rerun.wait()
    assert all((out / p).read_bytes() == b for p, b in finished.items())  # the killed rerun clobbered nothing
    assert json.loads((out.with_name("seed-0.partial") / "metrics.json").read_text())["status"] == "running"

    resumed = start(data_dir, tmp_path / "quiet", "--resume")
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    assert "resuming after epoch" in stdout
    resumed_metrics = json.loads((out / "metrics.json").read_text())
    assert resumed_metrics["status"] == "finished" and not out.with_name("seed-0.partial").exists()
    uninterrupted = json.loads(finished["metrics.json"])
    for record in uninterrupted["history"]:
        record.pop("seconds")
    assert comparable(out / "metrics.json") == {k: uninterrupted[k] for k in COMPARED}


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])  # SIGTERM: kill, docker, Slurm
def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(data_dir, tmp_path, sig, code):
    process = start(data_dir, tmp_path, "--epochs", "100")  # still training when the signal lands, however fast the CPU
    partial = tmp_path / "01_base" / "seed-0.partial"
    wait_for_first_epoch(partial, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code
    assert "Traceback" not in stderr
    hint = stderr.strip().splitlines()[-1]
    assert hint.startswith("interrupted: ") and hint.endswith("--resume") and "python " in hint
    metrics = json.loads((partial / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and len(metrics["history"]) >= 1
    assert (partial / "checkpoint.pt").exists()  # what --resume continues (test above: it equals a whole run)


@pytest.mark.slow
def test_divergence_stops_with_one_line_and_status(data_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "02_no_bn.py"), "--quick", "--lr", "1e12", "--weight-decay", "0",
                           "--data-dir", str(data_dir), "--results-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    message = done.stderr.strip()
    assert message.startswith("error: ") and "loss became" in message and "--lr" in message and "\n" not in message
    assert "No epoch finished" in message  # it names no checkpoint that does not exist
    metrics = json.loads((tmp_path / "quick" / "02_no_bn" / "seed-0.partial" / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    assert not (tmp_path / "quick" / "02_no_bn" / "seed-0" / "metrics.json").exists()


@pytest.fixture
def finished_run(data_dir, tmp_path):
    """A small finished run whose files must survive every bad invocation below."""
    cfg = Config(name="01_base", width=8, epochs=1, train_subset=64, eval_subset=32, data_dir=str(data_dir),
                 results_dir=str(tmp_path / "results"))
    run(cfg)
    out = tmp_path / "results" / "01_base" / "seed-0"
    return cfg, out, (out / "metrics.json").read_bytes()


def exits_with_error(cfg, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message  # sys.exit(str): one line on stderr, status 1
    return message


def test_bad_inputs_one_line_errors_and_results_intact(finished_run, tmp_path, capsys):
    cfg, out, before = finished_run
    empty = tmp_path / "empty"
    empty.mkdir()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cases = {
        "data dir missing": (dict(data_dir=str(tmp_path / "nowhere")), "train_32x32.mat"),
        "subset too large": (dict(train_subset=10_000), "10000 requested"),
        "results not writable": (dict(results_dir=str(not_a_dir / "sub")), "cannot write results"),
        "nothing to resume": (dict(resume=True), "nothing to resume"),
        "no ImageNet weights file": (dict(arch="imagenet_resnet18", weights=str(tmp_path / "w.pth")), "no such file"),
    }
    for what, (changes, expected) in cases.items():
        assert expected in exits_with_error(dataclasses.replace(cfg, **changes), capsys), what
        assert (out / "metrics.json").read_bytes() == before, what


def test_resume_with_another_config_names_the_fields(finished_run, capsys):
    cfg, out, _ = finished_run
    out.with_name("seed-0.partial").mkdir()
    from common.lifecycle import save_checkpoint
    import torch
    from common.training import Progress
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=2)
    save_checkpoint(out.with_name("seed-0.partial") / "checkpoint.pt", cfg, model, optimizer, schedule,
                    torch.amp.GradScaler("cpu", enabled=False), Progress(), {})
    message = exits_with_error(dataclasses.replace(cfg, resume=True, lr=0.5, epochs=3), capsys)
    assert "--epochs 1 (now 3)" in message and "--lr 0.1 (now 0.5)" in message


@pytest.mark.slow
def test_sigterm_while_the_data_loads_exits_143_without_a_traceback(data_dir, tmp_path):
    code = ("import time, common.data as d; real = d.load\n"
            "def slow(*a):\n    print('loading', flush=True); time.sleep(30); return real(*a)\n"
            "d.load = slow\n"
            "from common import Config, run\n"
            f"run(Config(width=8, epochs=1, train_subset=64, data_dir={str(data_dir)!r}, results_dir={str(tmp_path)!r}))")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    while process.stdout.readline().strip() != "loading":  # the config is printed first
        assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert "no epoch finished; rerun" in stderr
    assert json.loads((tmp_path / "01_base/seed-0.partial/metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow  # a fresh interpreter importing torch: the only way to be inside that import
def test_ctrl_c_while_torch_imports_is_one_line_and_exit_130(tmp_path):
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import signal; before = signal.getsignal(signal.SIGINT); import common; " \
           "assert signal.getsignal(signal.SIGINT) is before; print('imported')"
    whole = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert whole.stdout.strip() == "imported", whole.stderr  # the handler is back once the import is done
    started = time.time()
    process = subprocess.Popen([sys.executable, "-c", "import common"], stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.5)  # python is up, torch is still importing (seconds)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in err, (process.returncode, err, time.time() - started)
