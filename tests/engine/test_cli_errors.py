"""What a person sees when something is wrong: usage mistakes and user errors are one line on stderr
with exit code 2, and data printed to the terminal (categories, paths) is shown verbatim, never
interpreted as rich markup or terminal control sequences."""

import importlib.metadata
import json

import pytest

from engine.cli import main
from schemas import SCHEMA_VERSION
from tests.helpers.coco_fixture import write_coco

NASTY = "[/x]\x1b[31mred"  # closes a rich tag that is not open, then an ANSI colour sequence


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["synthesize", "--sourc", "demo"], "No such option: --sourc (did you mean --source?)"),
        (["sythesize"], "No such command 'sythesize'. Did you mean 'synthesize'?"),
        (["synthesize", "--unit-size", "abc"], "Invalid value for '--unit-size'"),
        (["train", "--stepz", "3"], "No such option: --stepz (did you mean --steps?)"),
        (["query"], "Missing argument 'out'"),
        (["export", "runs/x"], "Missing option '--to'"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("error: ") and needle in line
    assert "--help'" in line  # names the help command to run
    assert len(line) < 200
    assert captured.out == ""


def test_version_names_package_and_schema(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"mqengine {importlib.metadata.version('mqengine')}, schema {SCHEMA_VERSION}"


@pytest.fixture(scope="module")
def nasty_run(tmp_path_factory):
    """A run whose first category name is rich markup plus an ANSI escape sequence."""
    root = tmp_path_factory.mktemp("nasty")
    ann = write_coco(root / "ds", n_images=2)
    data = json.loads(ann.read_text())
    data["categories"][0]["name"] = NASTY
    ann.write_text(json.dumps(data))
    out = root / "out"
    code = main(["synthesize", "--source", "coco", "--root", str(root / "ds"), "--annotations",
                 str(ann), "--out", str(out), "--executor", "local", "--masker", "box"])
    assert code == 0
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["query", "SELECT DISTINCT category FROM objects ORDER BY 1"],
    ],
)
def test_markup_and_escapes_in_data_are_printed_verbatim(nasty_run, argv, capsys):
    command, *rest = argv
    assert main([command, str(nasty_run), *rest]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # the escape sequence never reaches the terminal
    assert "[/x]\\x1b[31mred" in out  # ... it is shown, escaped, with the markup as typed


def test_markup_in_an_error_message_is_printed_verbatim(tmp_path, capsys):
    missing = tmp_path / "[/x]\x1b[31mgone"
    assert main(["query", str(missing), "SELECT 1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "\x1b" not in line
    assert line == f"error: {tmp_path}/[/x]\\x1b[31mgone: no such folder"
