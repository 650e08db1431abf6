"""One run on two processes under torchrun (gloo, CPU), against the same run in one process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # torchrun subprocesses

# BN-free and fp32, so that no per-rank BatchNorm statistics or bf16 rounding separate the two.
RUN = ["--norm", "none", "--amp", "off", "--width", "16", "--train-subset", "512", "--eval-subset", "64",
       "--batch-size", "64", "--lr", "0.1"]


def launch(data_dir, results_dir, *extra, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 \
        else [sys.executable]
    return subprocess.Popen([*command, str(ROOT / "02_no_bn.py"), *RUN, "--data-dir", str(data_dir),
                             "--results-dir", str(results_dir), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def finished(process, timeout=240):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def metrics(results_dir):
    return json.loads((results_dir / "02_no_bn" / "seed-0" / "metrics.json").read_text())


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(data_dir, tmp_path):
    finished(launch(data_dir, tmp_path / "one", "--epochs", "2", processes=1))
    finished(launch(data_dir, tmp_path / "two", "--epochs", "2"))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one["steps"]) == len(two["steps"]) == 2 * ((512 - 26) // 64)
    for a, b in zip(one["steps"], two["steps"]):  # DDP averages gradients: equal up to the reduction order
        assert abs(a - b) <= 1e-4 * abs(a), (one["steps"], two["steps"])
    assert one["steps"][0] != one["steps"][-1]  # the run moved
    assert (two["world_size"], two["backend"], two["batchnorm_stats"]) == (2, "gloo", "per process")
    assert [p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("metrics.json")] == \
        [p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("metrics.json")]  # rank 0 alone wrote


def test_launcher_killed_then_resumed_under_torchrun_equals_uninterrupted(data_dir, tmp_path):
    finished(launch(data_dir, tmp_path / "whole", "--epochs", "3"))
    killed = launch(data_dir, tmp_path / "killed", "--epochs", "3")
    checkpoint = tmp_path / "killed" / "02_no_bn" / "seed-0.partial" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert time.time() < deadline and killed.poll() is None, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # the launcher alone: its workers must not run on behind a resume
    killed.wait()
    time.sleep(1)
    assert not (tmp_path / "killed" / "02_no_bn" / "seed-0").exists()
    assert "resuming after epoch" in finished(launch(data_dir, tmp_path / "killed", "--epochs", "3", "--resume"))
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "killed")
    for key in ("steps", "test", "best_epoch", "best_val_acc", "confusion"):
        assert whole[key] == resumed[key], key


def test_bad_input_under_torchrun_is_one_line_and_quick(data_dir, tmp_path):
    started = time.time()
    process = launch(data_dir, tmp_path, "--epochs", "1", "--batch-size", "63")  # not divisible by 2 processes
    _, err = process.communicate(timeout=60)
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert process.returncode != 0 and time.time() - started < 60
    assert ours == ["error: --batch-size 63 (the global batch) must be divisible by the 2 processes"], err[-2000:]


def _check_in_group(rank, store, configs, results):
    import torch.distributed as dist
    from common import UserError
    from common.distributed import check_same_config
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_same_config(configs[rank])
        results.put((rank, None))
    except UserError as e:
        results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_ranks_launched_with_different_flags_are_refused_on_every_rank(tmp_path):
    import torch.multiprocessing as mp
    context = mp.get_context("spawn")
    results = context.Queue()
    configs = [dict(lr=0.1, seed=0, epochs=3), dict(lr=0.2, seed=0, epochs=3)]
    processes = [context.Process(target=_check_in_group, args=(r, tmp_path / "store", configs, results)) for r in (0, 1)]
    for p in processes:
        p.start()
    outcome = dict(results.get(timeout=60) for _ in processes)
    for p in processes:
        p.join(timeout=30)
    assert outcome[0] == outcome[1] and "--lr" in outcome[0] and "--seed" not in outcome[0]


def test_stray_rank_without_torchrun_is_one_line(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, str(ROOT / "01_base.py"), "--quick", "--data-dir", str(data_dir),
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env=dict(env, RANK="1", PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and done.stderr.strip() == ("error: RANK=1 set, but this process was not started by "
                                                             "torchrun (no MASTER_ADDR): unset them, or launch with torchrun")
    assert not (tmp_path / "quick").exists()
