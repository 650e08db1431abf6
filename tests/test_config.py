import pytest

from common import Config, cli
from common.config import UserError


BASE = Config(name="t", lr=0.05)


def test_only_passed_flags_override():
    cfg = cli(BASE, ["--epochs", "3", "--batch-size", "64"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.name) == (3, 64, 0.05, "t")
    assert cli(BASE, []) == BASE


def test_booleans_and_alias():
    assert cli(BASE, ["--quick"]).quick is True
    assert cli(Config(quick=True), ["--no-quick"]).quick is False
    assert cli(BASE, ["--subset-size", "500"]).train_subset == 500


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--epochs", "0"], ["--batch-size", "-1"], ["--lr", "0"],
                                  ["--norm", "group"], ["--epochs", "two"], ["--val-fraction", "0"]])
def test_bad_flags_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(BASE, argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_invalid_config_in_code_is_rejected():
    with pytest.raises(UserError, match="--label-smoothing"):
        Config(label_smoothing=1.5)


def test_help_shows_why_comments_01s_value_beside_the_scripts_and_every_choice(capsys):
    with pytest.raises(SystemExit):
        cli(BASE, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "peak of the one-cycle schedule (default: 0.05; 01_base: 0.1)" in out
    assert "--batch-size BATCH_SIZE (default: 128)" in out
    for choices in ("--input-norm {dataset,image,edges}", "--norm {batch,none}", "--tta {none,bn,tent,shot,t3a}[,...]",
                    "--consistency-geometry {independent,shared}", "--amp {auto,bf16,fp16,off}"):
        assert choices in out


def test_07s_help_gives_its_own_reasons_not_01s(capsys):
    import importlib.util
    import sys
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("reverse_mnist", ROOT / "07_reverse_mnist.py")
    script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.cli(script.CONFIG, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: ") and "07 · Reverse direction" in out  # 07's docstring, not the caller's
    assert "(default: 8; 01_base: 15)" in out and "converge on full SVHN" not in out  # 01's reason for 15 epochs
    assert "the first steps on strange textures otherwise swing the weights far (default: 1.0; 01_base: 0.0)" in out
    assert "DG_FIELDS" not in out and "ReverseConfig" not in out  # no internal names
    # 04's augmentation under the cross-domain preset: where both set a field (the perspective warp), 07 takes
    # the preset's value, and 04's other strengths unchanged.
    from common import AUGMENT_04, CROSS_DOMAIN
    assert AUGMENT_04["perspective"] > 0 and script.CONFIG.perspective == CROSS_DOMAIN["perspective"] == 0
    assert all(getattr(script.CONFIG, k) == v for k, v in AUGMENT_04.items() if k not in CROSS_DOMAIN)


def test_flag_types_come_from_the_annotations():
    assert cli(Config(rotate=15), ["--rotate", "12.5"]).rotate == 12.5  # a script's int literal, a float field
    assert cli(BASE, ["--epochs", "3"]).epochs == 3
    with pytest.raises(SystemExit):
        cli(BASE, ["--epochs", "2.5"])


@pytest.mark.parametrize("argv", [["--rotate", "inf"], ["--rotate", "nan"], ["--lr", "inf"], ["--momentum", "nan"],
                                  ["--weight-decay", "nan"], ["--seed", "-1"], ["--momentum", "1.5"],
                                  ["--val-fraction", "0.99"], ["--width", "0"], ["--rotate", "1000"],
                                  ["--name", "../elsewhere"], ["--name", "04_augmentation"], ["--resume", "--restart"],
                                  ["--tta", "bn", "--norm", "none"], ["--randconv", "1.5"], ["--prorandconv", "-0.5"],
                                  ["--prorandconv-layers", "0"], ["--consistency", "-1"], ["--tta", "bn,bn"],
                                  ["--tta", "shot,adabn"], ["--amplitude", "1.5"], ["--ibn", "1"], ["--ibn", "0.5", "--norm", "none"],
                                  ["--amplitude-band", "0.2"], ["--swa", "1"],
                                  ["--mixstyle", "0.5", "--arch", "imagenet_resnet18"], ["--shot-lr", "0.1"],
                                  ["--consistency-geometry", "shared"], ["--t3a-filter", "0"],
                                  ["--consistency", "1", "--views", "1", "--rotate", "5"], ["--consistency", "1"],
                                  ["--prorandconv-per", "pixel"], ["--prorandconv-offsets", "pink"],
                                  ["--clip-grad", "-1"], ["--dg-ramp", "1"], ["--prorandconv-field", "0"],
                                  ["--tent-batch", "0"], ["--dg-output", "clamped"], ["--consistency-clean"],
                                  ["--prorandconv-offset", "10"], ["--randconv-per", "all"], ["--dev-images", "0"],
                                  ["--views", "3"], ["--weights", "w.pth"], ["--tent-lr", "0.1"],
                                  ["--prorandconv-per", "batch"], ["--dg-ramp", "0.2"]])
def test_out_of_range_and_non_finite_flags_are_two_lines(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(BASE, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 2 and "error:" in err[0] and "--help" in err[1], err


def test_a_probability_may_be_one_and_a_fraction_of_steps_or_channels_may_not():
    always = cli(BASE, ["--prorandconv", "1", "--background", "1", "--amplitude", "1", "--invert", "1"])
    assert (always.prorandconv, always.background, always.amplitude, always.invert) == (1, 1, 1, 1)
    for argv in (["--swa", "1"], ["--warmup", "1"], ["--ibn", "1"]):
        with pytest.raises(SystemExit):
            cli(BASE, argv)


def test_a_scripts_default_can_be_switched_back_off_with_what_it_needs():
    reverse = Config(name="07_x", dataset="mnist", rotate=5, prorandconv=0.5, consistency=1.0, consistency_clean=True)
    plain = cli(reverse, ["--prorandconv", "0", "--consistency", "0", "--no-consistency-clean"])
    assert (plain.prorandconv, plain.consistency, plain.consistency_clean) == (0, 0, False)
    with pytest.raises(SystemExit):  # switching it on where it can do nothing is still refused
        cli(BASE, ["--consistency-clean"])


def test_non_finite_config_in_code_is_rejected():
    with pytest.raises(UserError, match="finite"):
        Config(lr=float("nan"))


def help_text(config, capsys):
    with pytest.raises(SystemExit):
        cli(config, ["--help"])
    return capsys.readouterr().out


def test_help_groups_flags_and_leads_with_what_the_script_changes(capsys):
    from common import AUGMENT_04
    out = help_text(Config(name="04_augmentation", label_smoothing=0.1, **AUGMENT_04), capsys)
    titles = [line.rstrip(":") for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")
              and line not in ("options:", "optional arguments:")]  # argparse's own group: just --help
    assert titles[0] == "what 04_augmentation changes from 01_base (or adds)"
    assert {"data", "model", "optimization", "augmentation", "cross-domain", "runtime"} <= set(titles)
    changed = out.split(titles[0])[1].split(titles[1])[0]
    assert "--rotate" in changed and "--label-smoothing" in changed and "--lr" not in changed
    assert "(default: 15; 01_base: 0.0)" in changed


def test_flags_of_one_script_are_not_offered_by_another(capsys):
    assert "--sweep" not in help_text(Config(), capsys) and "--inherit-best" not in help_text(Config(), capsys)
    with pytest.raises(SystemExit) as exit_info:
        cli(Config(), ["--sweep"])
    assert exit_info.value.code == 2


@pytest.mark.slow  # a subprocess: a fresh interpreter is the only clean slate
def test_importing_common_changes_no_global_state():
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import os, matplotlib; b = matplotlib.get_backend(); mask = os.umask(0o027); os.umask(mask); "
            "import common, common.results, common.report, common.bench; "
            "assert matplotlib.get_backend() == b, (b, matplotlib.get_backend()); "
            "now = os.umask(0o022); assert now == mask, (now, mask); print(b)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"MPLBACKEND": "TkAgg", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "TkAgg", done.stderr


def test_a_bad_flag_is_said_even_with_a_stray_rank_in_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # inherited from a Slurm step or a notebook: no torchrun, no MASTER_ADDR
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli(BASE, ["--epochs", "0"])
    assert exit_info.value.code == 2 and "--epochs must be > 0" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # a real rank 1 under torchrun: rank 0 says it, once
    with pytest.raises(SystemExit):
        cli(BASE, ["--epochs", "0"])
    assert capsys.readouterr().err == ""
