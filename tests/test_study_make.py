"""The whole study as Make targets: finished runs skipped, interrupted ones resumed, 08 after 07."""
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU Make")


def make(results, target="quick-study", **variables):
    args = ["make", "-n", "-C", str(ROOT), target, f"R={results}", "PY=python"] + [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def plan(results, target="quick-study", **variables):
    """What `make -n` would run: the commands, one per line."""
    done = make(results, target, **variables)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("python")]


@pytest.mark.parametrize("variables, message", [
    (dict(FLAGS="--name other"), "FLAGS may not hold --name"), (dict(FLAGS="--quick"), "FLAGS may not hold --quick"),
    (dict(FLAGS="--seed 3"), "FLAGS may not hold --seed"), (dict(SEEDS="01"), "'01' is not a seed"),
    (dict(SEEDS=""), "SEEDS is empty")])
def test_variables_that_would_move_a_run_away_from_its_target_are_refused(tmp_path, variables, message):
    done = make(tmp_path, "study", **variables)
    assert done.returncode != 0 and message in done.stderr


def test_finished_metrics_survive_an_interrupt_and_each_recipe_checks_its_target(tmp_path):
    done = make(tmp_path, "study", SEEDS="0")
    assert "finished without writing" in done.stdout  # the check after every run
    database = subprocess.run(["make", "-pn", "-C", str(ROOT), "study", f"R={tmp_path}", "SEEDS=0", "PY=python"],
                              capture_output=True, text=True, timeout=30).stdout.split("\n\n")
    target = next(block for block in database if block.startswith(f"{tmp_path}/07_reverse_mnist/seed-0/metrics.json:"))
    assert "Precious file" in target  # make deletes an interrupted target unless it is precious
    (tmp_path / "04_augmentation" / "seed-0.partial").mkdir(parents=True)
    (tmp_path / "04_augmentation" / "seed-0.partial" / "checkpoint.pt").write_text("")
    assert any(c.startswith("python 04_augmentation.py") and c.endswith("--restart")
               for c in plan(tmp_path, "study", SEEDS="0", RESTART="1"))


def test_a_fresh_study_runs_every_script_and_08_after_07(tmp_path):
    commands = plan(tmp_path)
    scripts = [c.split()[1] for c in commands[:-1]]
    assert sorted(scripts) == sorted(p.name for p in ROOT.glob("[0-9][0-9]_*.py"))
    assert scripts.index("08_finetune_svhn.py") > scripts.index("07_reverse_mnist.py")
    assert all("--quick" in c and "--resume" not in c for c in commands[:-1]) and "common.report" in commands[-1]
    full = plan(tmp_path, "study", SEEDS="0 1")
    assert sum("--seed 1" in c for c in full) == 9 and sum("--seed 0" in c for c in full) == 9


def test_finished_runs_are_skipped_and_an_interrupted_one_resumed(tmp_path):
    for script in sorted(ROOT.glob("[0-9][0-9]_*.py")):  # in order: 08 finishes after 07
        finished = tmp_path / "quick" / script.stem / "seed-0" / "metrics.json"
        finished.parent.mkdir(parents=True)
        finished.write_text("{}")
    assert [c.split()[1] for c in plan(tmp_path)] == ["-m"]  # the report alone
    (tmp_path / "quick" / "04_augmentation" / "seed-0" / "metrics.json").unlink()
    (tmp_path / "quick" / "04_augmentation" / "seed-0.partial").mkdir()
    (tmp_path / "quick" / "04_augmentation" / "seed-0.partial" / "checkpoint.pt").write_text("")
    commands = plan(tmp_path)
    assert len(commands) == 2 and commands[0].startswith("python 04_augmentation.py") and commands[0].endswith("--resume")
