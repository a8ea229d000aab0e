"""The HTML report: numbers checked against an independent reader (pyarrow + numpy), and the page
checked in a real headless browser (Debian's chromium) opened from file://."""

from __future__ import annotations

import re
import shutil
import subprocess
import tracemalloc
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.query import connect
from pipelines.report import QUALITY, ReportConfig, write_report
from schemas.runs import open_run
from tests.helpers.runs import read_table, synthesize_photos, write_large_run

SAMPLE = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return synthesize_photos(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(run_dir):
    out = run_dir / "report"
    write_report(open_run(run_dir), out, ReportConfig(sample=SAMPLE, seed=0))
    return out


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of table cells by table."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = defaultdict(list)
        self._table, self._cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = a.get("data-table")
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or
                                                                             "").split())]


def _page(report: Path) -> Elements:
    return Elements((report / "index.html").read_text())


def _group(image: dict, objects: list[dict]) -> str:
    statuses = {o["status"] for o in objects}
    if image["status"] != "ok" or "rejected" in statuses:
        return "rejected"
    return "filtered" if "filtered" in statuses else "kept"


def test_sample_is_deterministic_and_shows_every_status(run_dir, report, tmp_path):
    cards = [a["data-image-id"] for a in _page(report).find("div", "card")]
    assert len(cards) == len(set(cards)) == SAMPLE
    images = {r["image_id"]: r for r in read_table(run_dir, "images")}
    by_image = defaultdict(list)
    for o in read_table(run_dir, "objects"):
        by_image[o["image_id"]].append(o)
    groups = {_group(images[i], by_image[i]) for i in cards}
    assert groups == {"kept", "filtered", "rejected"}
    again = tmp_path / "again"
    write_report(open_run(run_dir), again, ReportConfig(sample=SAMPLE, seed=0))
    assert [a["data-image-id"] for a in _page(again).find("div", "card")] == cards
    write_report(open_run(run_dir), again, ReportConfig(sample=SAMPLE, seed=1))
    assert [a["data-image-id"] for a in _page(again).find("div", "card")] != cards


def test_cards_list_every_object_of_their_image(run_dir, report):
    page = _page(report)
    by_image = Counter(o["image_id"] for o in read_table(run_dir, "objects"))
    cards, objs = page.find("div", "card"), page.find("li", "obj")
    assert len(objs) == sum(by_image[c["data-image-id"]] for c in cards)
    for card in cards:
        img = [a for t, a in page.tags if t == "img" and a.get("alt") == card["data-image-id"]][0]
        assert (report / img["src"]).is_file() and (report / img["data-large"]).is_file()


def test_histograms_match_numpy_and_show_the_run_thresholds(run_dir, report):
    objects = read_table(run_dir, "objects")
    quality = open_run(run_dir).manifest["config"]["quality"]
    page = _page(report)
    hist_divs = {a["data-column"]: a for a in page.find("div", "hist")}
    assert set(hist_divs) == set(QUALITY)
    bins_by_column = _bins(report)
    for column in ("box_iou", "box_fill", "n_components"):
        bins = bins_by_column[column]
        edges = [float(b["data-lo"]) for b in bins] + [float(bins[-1]["data-hi"])]
        for status in ("kept", "filtered", "rejected"):
            values = [o[column] for o in objects if o["status"] == status and o[column] is not None]
            expected, _ = np.histogram(values, bins=edges)
            assert [int(b[f"data-{status}"]) for b in bins] == expected.tolist(), (column, status)
    assert float(hist_divs["box_iou"]["data-threshold"]) == quality["min_box_iou"]
    assert float(hist_divs["box_fill"]["data-threshold"]) == quality["min_box_fill"]
    assert "data-threshold" not in hist_divs["n_components"]  # max_components 0: no limit
    # grabcut gives no predicted IoU / stability: said so, not drawn as an empty chart
    assert "pred_iou" not in bins_by_column


def _bins(report: Path) -> dict[str, list[dict]]:
    """data attributes of each histogram's bins, by column (in page order)."""
    bins: dict[str, list[dict]] = defaultdict(list)
    column = None
    for tag, a in _page(report).tags:
        if tag == "div" and a.get("class") == "hist":
            column = a["data-column"]
        elif tag == "g" and a.get("class") == "bin":
            bins[column].append(a)
    return bins


def test_reject_codes_and_category_table_match_the_shards(run_dir, report):
    objects = read_table(run_dir, "objects")
    tables = _page(report).tables
    codes = Counter((o["status"], o["reject_code"]) for o in objects if not o["keep"])
    assert {(r[0], r[1]): int(r[2]) for r in tables["codes"][1:]} == codes
    rows = {r[0]: r[1:] for r in tables["categories"][1:]}
    by_cat = defaultdict(list)
    for o in objects:
        by_cat[o["category"] or "(none)"].append(o)
    assert set(rows) == set(by_cat)
    for cat, objs in by_cat.items():
        n, share, mean_iou, example = rows[cat]
        assert int(n) == len(objs)
        assert float(share) == pytest.approx(np.mean([o["keep"] for o in objs]), abs=1e-3)
        ious = [o["box_iou"] for o in objs if o["box_iou"] is not None]
        assert mean_iou == ("–" if not ious else f"{np.mean(ious):.3f}")
        captioned = sorted((o["object_id"], o["captions"][0]["text"]) for o in objs
                           if o["keep"] and o["captions"])
        assert example == (captioned[0][1] if captioned else "–")
    ov = {a["data-stat"]: a for a in _page(report).find("div", "stat")}
    assert set(ov) >= {"input objects", "kept", "filtered", "rejected"}


def test_page_requests_nothing_outside_its_folder(report):
    text = (report / "index.html").read_text()
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    urls = re.findall(r'(?:src|href|data-large)="([^"]*)"', text)
    assert urls and all(not re.match(r"[a-z]+:", u) and (report / u).is_file() for u in urls)
    assert "@import" not in text and "url(" not in text


# ------------------------------------------------------------------- the page in a real browser


def chromium(tmp_path: Path, url: str, *flags: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "chromium is not installed: the report tests open the page in Debian's `chromium` "
            "(apt-get install -y chromium; .ci/run installs it)"
        )
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}",
           *flags, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _console_problems(stderr: str) -> list[str]:
    """Console messages (the page logs none) and blocked requests, from chromium's log."""
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line or "Refused to" in line or "net::ERR" in line]


def _visible_cards(dom: str) -> list[str]:
    cards = re.findall(r'<div class="card( hidden)?" data-image-id="([^"]+)"', dom)
    return [image_id for hidden, image_id in cards if not hidden]


def test_page_renders_in_chromium_without_errors(report, tmp_path):
    done = chromium(tmp_path, (report / "index.html").as_uri(), "--dump-dom")
    dom = done.stdout
    assert _console_problems(done.stderr) == []
    assert re.search(r'<pre id="js-errors"></pre>', dom), "the page's script reported errors"
    assert 'data-ready="1"' in dom and 'data-broken-images="0"' in dom
    assert len(_visible_cards(dom)) == SAMPLE
    assert re.search(rf'<b id="shown">{SAMPLE}</b>', dom)


@pytest.mark.parametrize("key", ["status", "category", "code", "origin"])
def test_a_filter_in_the_url_changes_what_is_shown(run_dir, report, tmp_path, key):
    cards = [a["data-image-id"] for a in _page(report).find("div", "card")]
    objects = [o for o in read_table(run_dir, "objects") if o["image_id"] in cards]
    field, value = {
        "status": ("status", "rejected"),
        "category": ("category", "person"),
        "code": ("reject_code", "box_invalid"),
        "origin": ("mask_origin", "grabcut+ellipse-fallback"),
    }[key]
    expected = sorted({o["image_id"] for o in objects if o[field] == value})
    assert 0 < len(expected) < len(cards)  # the filter has something to hide and to show
    fragment = {"status": "status=rejected", "category": "category=person",
                "code": "status=code%3Abox_invalid",
                "origin": "origin=grabcut%2Bellipse-fallback"}[key]
    done = chromium(tmp_path, (report / "index.html").as_uri() + "#" + fragment, "--dump-dom")
    assert _console_problems(done.stderr) == []
    assert '<pre id="js-errors"></pre>' in done.stdout
    assert sorted(_visible_cards(done.stdout)) == expected
    assert f'<b id="shown">{len(expected)}</b>' in done.stdout


def test_an_unknown_filter_value_is_reported_on_the_page(report, tmp_path):
    done = chromium(tmp_path, (report / "index.html").as_uri() + "#category=nosuch", "--dump-dom")
    assert "unknown category filter in URL: nosuch" in done.stdout


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, (report / "index.html").as_uri(), f"--screenshot={shot}",
             "--window-size=1280,2400", "--hide-scrollbars")
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20  # a blank or unstyled page is near-uniform
    # the gallery's thumbnails are drawn: the lower half has photo-like detail, not just text
    assert np.unique(pixels[1200:].astype(np.uint8)).size > 64


# ----------------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_a_100k_object_run_is_sampled_not_loaded(tmp_path):
    run_dir = write_large_run(tmp_path / "large", n_images=25_000, objects_per_image=4)
    tracemalloc.start()
    result = write_report(open_run(run_dir), tmp_path / "r", ReportConfig(sample=12))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result["images"] == 12
    # Python holds only the sample (12 images' objects): far below what 100k rows would take
    assert peak < 40e6, f"peak Python allocation {peak / 1e6:.0f} MB"
    bins = _bins(tmp_path / "r")["box_iou"]
    total = sum(int(b[f"data-{s}"]) for b in bins for s in ("kept", "filtered", "rejected"))
    assert total == 100_000


def test_max_components_threshold_sits_where_failing_bins_start(tmp_path):
    from pipelines.report import _histogram_svg, _threshold

    assert _threshold("n_components", {"max_components": 0}) is None  # 0 = any number
    assert _threshold("n_components", {"max_components": 2}) == 3.0  # 3 or more fail
    hist = {"column": "n_components", "n": 4, "edges": [0.0, 1.0, 2.0, 3.0, 4.0],
            "bins": [{"kept": 1, "filtered": 0, "rejected": 0}] * 4}
    svg = _histogram_svg(hist, 3.0)
    x = float(re.search(r'<line class=threshold x1="([\d.]+)"', svg).group(1))
    bars = [float(v) for v in re.findall(r'<rect x="([\d.]+)"', svg)]
    assert bars[2] < x <= bars[3]  # between the bar of 2 (passes) and the bar of 3 (fails)


def test_category_table_says_when_it_is_cut(tmp_path):
    from pipelines.report import _category_html

    run_dir = write_large_run(tmp_path / "many", n_images=40, objects_per_image=8, units=1)
    text = _category_html(connect(open_run(run_dir)), limit=3)
    assert "the 3 largest of 7 categories" in text
    assert text.count("<tr>") == 1 + 3
