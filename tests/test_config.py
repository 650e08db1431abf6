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


def test_help_shows_why_comments(capsys):
    with pytest.raises(SystemExit):
        cli(BASE, ["--help"])
    out = capsys.readouterr().out
    assert "--batch-size" in out and "--no-augment" not in out
    assert "peak of the one-cycle schedule (default: 0.05)" in out
