import subprocess
import sys
from pathlib import Path

import pytest

from clip_dro.cli import build_parser, main

COMMANDS = ["prep", "train", "eval", "quickstart", "bench"]


def test_console_script_lists_subcommands():
    script = Path(sys.executable).parent / "clip-dro"  # the console script installed beside this interpreter
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("argv", [[c, "--help"] for c in COMMANDS if c != "prep"]
                         + [["prep", s, "--help"] for s in ["synthetic", "csv", "coco", "wds"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 0
    assert "usage: clip-dro" in capsys.readouterr().out


def test_user_error_is_one_line_and_nonzero(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "missing.yaml does not exist" in err


def test_missing_required_option_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "clip_dro.cli", "prep", "csv", "--output", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--input" in proc.stderr
