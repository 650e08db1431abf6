"""A saved model evaluated alone, and the per-run files a spreadsheet reads."""
import csv
import dataclasses
import json

import pytest
import torch

from common import Config, cli, launch, run
from common.experiment import evaluate_saved

SMALL = Config(name="07_reverse_mnist", dataset="mnist", width=8, epochs=2, train_subset=128, eval_subset=64)


@pytest.fixture(scope="module")
def finished(all_domains_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cfg = dataclasses.replace(SMALL, data_dir=str(all_domains_dir), results_dir=str(results))
    run(cfg)
    return cfg, results / "07_reverse_mnist" / "seed-0"


def test_evaluate_reproduces_the_runs_test_accuracies_on_every_domain(finished, capsys):
    cfg, out = finished
    before = (out / "metrics.json").read_bytes()
    metrics = json.loads(before)
    results = evaluate_saved(dataclasses.replace(Config(), data_dir=cfg.data_dir, evaluate=str(out / "model.pt"),
                                                 tta="bn"))
    assert results["test"] == metrics["test"] and set(results["test"]) == {"svhn", "mnist", "mnistm", "usps"}
    assert set(results["test_tta"]["bn"]) == {"svhn", "mnistm", "usps"}
    printed = capsys.readouterr().out
    assert f"MNIST-M  test {100 * metrics['test']['mnistm']:.2f}% | after --tta bn" in printed
    written = json.loads(out.with_name("seed-0.evaluation.json").read_text())
    assert written["test"] == metrics["test"] and written["model"] == str(out / "model.pt")
    assert (out / "metrics.json").read_bytes() == before  # the run's own record is never touched


def test_evaluate_refuses_a_foreign_or_mismatched_file_in_one_line(finished, tmp_path):
    cfg, out = finished
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(out / "model.pt", weights_only=True)
    torch.save(dict(saved, config=dict(saved["config"], width=16)), mismatched)
    for path, message in ((foreign, "not a model.pt of this project"), (mismatched, "does not fit the network"),
                          (tmp_path / "missing.pt", "no such file")):
        with pytest.raises(SystemExit) as exit_:
            launch(None, dataclasses.replace(Config(), data_dir=cfg.data_dir, evaluate=str(path)))
        assert message in str(exit_.value.code) and "\n" not in str(exit_.value.code)


def test_history_csv_has_one_row_per_epoch_matching_metrics(finished):
    _, out = finished
    rows = list(csv.DictReader((out / "history.csv").open()))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["val_acc"]) for r in rows] == [h["val_acc"] for h in history]
    assert [float(r["train_loss"]) for r in rows] == [h["train_loss"] for h in history]


def test_evaluate_refuses_an_empty_path_and_flags_it_would_not_use(finished, capsys):
    cfg, out = finished
    for argv, message in ((["--evaluate", ""], "needs the path of a model.pt"),
                          (["--evaluate", str(out / "model.pt"), "--epochs", "3", "--width", "16"],
                           "--epochs, --width would change nothing")):
        with pytest.raises(SystemExit) as exit_:
            launch(None, cli(Config(), argv + ["--data-dir", cfg.data_dir]))
        assert message in str(exit_.value.code) + capsys.readouterr().err  # one line, nothing trained


def test_a_model_file_outside_a_run_folder_is_evaluated_under_its_own_name(finished, tmp_path, monkeypatch):
    cfg, out = finished
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pt").write_bytes((out / "model.pt").read_bytes())
    results = evaluate_saved(cli(Config(name="09_domain_generalization", tta="bn,tent"),
                                 ["--evaluate", "model.pt", "--data-dir", cfg.data_dir]))
    written = json.loads((tmp_path / "model.evaluation.json").read_text())
    assert written["config"]["name"] == "07_reverse_mnist" and written["test"] == results["test"]  # the model's name


def test_dev_only_adapts_to_the_dev_sets_and_never_touches_a_test_set(finished, capsys):
    cfg, out = finished
    results = evaluate_saved(cli(Config(), ["--evaluate", str(out / "model.pt"), "--data-dir", cfg.data_dir,
                                            "--dev-only", "--tta", "shot"]))
    assert results["test"] == {} and results["test_tta"] == {"shot": {}}
    assert set(results["dev_tta"]["shot"]) == {"mnistm", "usps"} and " test " not in capsys.readouterr().out
    assert json.loads(out.with_name("seed-0.evaluation.dev.json").read_text())["dev_tta"] == results["dev_tta"]


def test_a_model_without_batchnorm_drops_a_scripts_default_tta_and_blames_a_passed_one(finished, tmp_path):
    from common.errors import UserError
    from common.experiment import evaluation_config
    cfg, out = finished
    saved = torch.load(out / "model.pt", weights_only=False)
    saved["config"]["norm"] = "none"  # as 02_no_bn writes it
    script = Config(name="09_domain_generalization", tta="bn,tent")  # 09's default --tta
    assert evaluation_config(cli(script, ["--evaluate", "m.pt"]), "m.pt", saved).tta == "none"
    assert evaluation_config(cli(script, ["--evaluate", "m.pt", "--tta", "t3a"]), "m.pt", saved).tta == "t3a"
    with pytest.raises(UserError, match=r"^--tta bn,shot adapts BatchNorm layers and m.pt has none \(trained with --norm none\)"):
        evaluation_config(cli(script, ["--evaluate", "m.pt", "--tta", "bn,shot"]), "m.pt", saved)


def test_a_model_file_written_before_a_network_field_existed_is_read_with_its_default(finished, tmp_path):
    cfg, out = finished
    saved = torch.load(out / "model.pt", weights_only=True)
    older = tmp_path / "older.pt"
    torch.save(dict(saved, config={k: v for k, v in saved["config"].items() if k != "ibn"}), older)  # before --ibn
    results = evaluate_saved(dataclasses.replace(Config(), data_dir=cfg.data_dir, evaluate=str(older), tta="none"))
    assert results["test"] == json.loads((out / "metrics.json").read_text())["test"]
