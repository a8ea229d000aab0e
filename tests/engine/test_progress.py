"""Progress of `engine synthesize`: plain lines at a fixed interval when stderr is not a terminal
(logs), a rich bar over images with an ETA on a terminal."""

import io
import re
import time

import pytest
from rich.console import Console

from engine.cli import main
from engine.progress import BarProgress, Counts, LineProgress, duration
from tests.helpers.coco_fixture import write_coco

LINE = re.compile(
    r"synthesize: (\d+)/(\d+) images \((\d+)%\), ([\d.]+) images/s, ([\d.]+) objects/s, ETA (\S+)")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def entry(images: int, objects: int) -> dict:
    return {"counts": {"images": images, "objects": objects}}


def test_line_reports_done_total_rates_and_eta():
    clock = Clock()
    counts = Counts(clock)
    counts.started(images_total=200, images_done=40)  # a resumed run: 40 images already done
    clock.t += 8.0
    counts.add(entry(32, 96))
    counts.add(entry(8, 4))
    # 40 new images and 100 objects in 8 s; 120 images left at 5 images/s
    assert counts.line() == ("synthesize: 80/200 images (40%), 5.0 images/s, 12.5 objects/s, "
                             "ETA 24s")
    assert [duration(s) for s in (15, 166, 3725)] == ["15s", "2m46s", "1h02m"]


def test_line_progress_prints_at_the_interval_until_closed():
    stream = io.StringIO()
    progress = LineProgress(stream, interval=0.01)
    progress.on_start(3, 1, 30, 10)
    progress.on_unit(entry(10, 25))
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "synthesize: 30 images in 3 units, 1 units already done; a line every 0.01 s"
    periodic = [LINE.fullmatch(line) for line in lines[1:]]
    assert len(periodic) >= 4 and all(periodic)
    assert [int(m[1]) for m in periodic][-1] == 20
    n = len(lines)
    time.sleep(0.05)
    assert len(stream.getvalue().splitlines()) == n  # closed: no more lines


@pytest.fixture
def dataset(tmp_path):
    ann = write_coco(tmp_path / "ds", n_images=6)
    return ["synthesize", "--source", "coco", "--root", str(tmp_path / "ds"), "--annotations",
            str(ann), "--out", str(tmp_path / "out"), "--executor", "local", "--masker", "box",
            "--unit-size", "2"]


def test_synthesize_prints_plain_lines_when_stderr_is_not_a_terminal(dataset, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("MQENGINE_PROGRESS_INTERVAL", "0.01")
    assert main(dataset) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "synthesize: 6 images in 3 units, 0 units already done; a line every 0.01 s"
    lines = [m for line in err if (m := LINE.fullmatch(line))]
    assert lines, err
    done = [int(m[1]) for m in lines]
    assert done == sorted(done) and done[-1] == 6 and {int(m[2]) for m in lines} == {6}
    assert lines[-1][3] == "100" and lines[-1][6] == "0s"
    # a rerun resumes: everything is already done
    assert main(dataset) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "synthesize: 6 images in 3 units, 3 units already done; a line every 0.01 s"
    assert err[1].startswith("synthesize: 6/6 images (100%), 0.0 images/s")


def test_bad_interval_is_one_line(dataset, monkeypatch, capsys):
    monkeypatch.setenv("MQENGINE_PROGRESS_INTERVAL", "soon")
    assert main(dataset) == 2
    assert capsys.readouterr().err.strip() == (
        "error: MQENGINE_PROGRESS_INTERVAL='soon' is not a number of seconds")


def test_terminal_bar_counts_images_with_an_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    bar = BarProgress(console)
    bar.on_start(4, 1, 40, 10)
    bar.on_unit(entry(10, 30))
    task = bar.progress.tasks[0]
    assert (task.total, task.completed) == (40, 20)  # images, not units
    bar.close()
    text = out.getvalue()
    assert "20/40" in text and "images" in text and "ETA" in text
