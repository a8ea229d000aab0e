"""`engine report`: one static HTML page that shows what a run synthesized.

The page opens from disk with no server and makes no network request: CSS and JS are inlined from
pipelines/report_assets/, charts are inline SVG, thumbnails are JPEG files beside it, and a
Content-Security-Policy forbids anything else. It shows the run at a glance (source, provenance,
counts, throughput, config), a histogram of every quality column with the manifest's thresholds
drawn on it, counts per reject code, a per-category table and a gallery of a deterministic sample
of images with mask overlays, where filters (category, status/reject code, mask_origin; mirrored
in the URL hash, e.g. `index.html#status=rejected`) choose which cards show.

Every number comes from DuckDB over the run's views (schemas.runs.Run.connect): only the sampled
images' objects are ever loaded into Python, so a 100k-object run costs what its sample costs.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import duckdb

from pipelines.card import wall_seconds
from pipelines.render import fit, object_colour, placeholder, render
from schemas.runs import Run

# quality column -> (threshold key in the manifest's config.quality, whether it is a minimum)
QUALITY = {
    "box_iou": ("min_box_iou", True),
    "box_fill": ("min_box_fill", True),
    "n_components": ("max_components", False),
    "pred_iou": ("min_pred_iou", True),
    "stability": ("min_stability", True),
}
STATUS_COLOURS = {"kept": "#3a9a4a", "filtered": "#ff8c00", "rejected": "#d62728"}
BINS = 32  # 1/32-wide bins on [0, 1]: edges are exact binary fractions
MAX_COMPONENT_BIN = 30  # n_components above this share the last bin
GROUPS = ("kept", "filtered", "rejected")
OBJECT_COLUMNS = (
    "object_id, image_id, category, box, mask, mask_origin, status, reject_code, reject_reason, "
    "box_iou, box_fill, n_components, pred_iou, stability, captions"
)
CSP = (
    "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'"
)


@dataclass
class ReportConfig:
    sample: int = 24  # images in the gallery
    seed: int = 0  # changes which images are sampled, reproducibly
    thumb: int = 400  # longer side of a gallery thumbnail, px
    large: int = 1280  # longer side of the enlarged picture, px

    def __post_init__(self) -> None:
        if self.sample < 1:
            raise ValueError(f"--sample must be at least 1, got {self.sample}")


def write_report(
    run: Run,
    out: Path,
    cfg: ReportConfig,
    on_image: Callable[[int, int], None] | None = None,
) -> dict:
    """Write `out/index.html` with `out/thumbs/` and `out/large/`; returns what it wrote.

    The folder is built beside `out` and renamed into place, so a killed report never leaves a
    half-written one (an older report at `out` is replaced only at the end)."""
    con = run.connect()
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (build / "thumbs").mkdir()
        (build / "large").mkdir()
        picked = sample_images(con, cfg.sample, cfg.seed)
        objects = sample_objects(con, [p["image_id"] for p in picked])
        cards = []
        for n, image in enumerate(picked):
            cards.append(_card(run, image, objects.get(image["image_id"], []), n, build, cfg))
            if on_image:
                on_image(n + 1, len(picked))
        page = _page(run, con, cards)
        (build / "index.html").write_text(page, encoding="utf-8")
        _swap_into_place(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return {"path": out / "index.html", "images": len(cards)}


REPORT_ENTRIES = {"index.html", "thumbs", "large"}


def check_replaceable(out: Path) -> None:
    """`out` is replaced as a whole at the end, so it must be new, empty or an earlier report:
    never the run folder or any other folder that holds something else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (choose another --out)")
    other = sorted(p.name for p in out.iterdir() if p.name not in REPORT_ENTRIES)
    if other:
        raise ValueError(
            f"{out}: holds {', '.join(other[:3])}, not only an earlier report; refusing to "
            "replace it (choose another --out)"
        )


def _swap_into_place(build: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(build, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- queries


def sample_images(con: duckdb.DuckDBPyConnection, n: int, seed: int) -> list[dict]:
    """A deterministic sample of `n` images that represents kept, filtered and rejected alike.

    Each image falls in the worst group among its objects (rejected when the image itself is bad
    or any object was rejected, else filtered when any was, else kept); within a group images are
    ordered by md5(image_id, seed), and the groups are interleaved (1st of each, then 2nd of
    each, ...), so every group that exists is in any sample of at least three images."""
    rows = con.execute(
        """
        WITH per_image AS (
            SELECT i.image_id, i.file_path, i.status AS image_status, i.error,
                CASE WHEN i.status <> 'ok' OR bool_or(o.status = 'rejected') THEN 'rejected'
                     WHEN bool_or(o.status = 'filtered') THEN 'filtered'
                     ELSE 'kept' END AS grp
            FROM images i LEFT JOIN objects o USING (image_id)
            GROUP BY i.image_id, i.file_path, i.status, i.error
        ), ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY grp ORDER BY md5(image_id || '/' || ?), image_id) AS r
            FROM per_image
        )
        SELECT image_id, file_path, image_status, error, grp FROM ranked
        ORDER BY r, CASE grp WHEN 'kept' THEN 0 WHEN 'filtered' THEN 1 ELSE 2 END
        LIMIT ?
        """,
        [str(seed), n],
    ).fetchall()
    keys = ("image_id", "file_path", "image_status", "error", "group")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def sample_objects(con: duckdb.DuckDBPyConnection, image_ids: list[str]) -> dict[str, list[dict]]:
    """The objects of the sampled images only, by image, in object_id order."""
    if not image_ids:
        return {}
    cursor = con.execute(
        f"SELECT {OBJECT_COLUMNS} FROM objects WHERE image_id IN (SELECT unnest(?)) "
        "ORDER BY image_id, object_id",
        [image_ids],
    )
    columns = [d[0] for d in cursor.description]
    by_image: dict[str, list[dict]] = {}
    for row in cursor.fetchall():
        obj = dict(zip(columns, row, strict=True))
        by_image.setdefault(obj["image_id"], []).append(obj)
    return by_image


def histogram(con: duckdb.DuckDBPyConnection, column: str) -> dict:
    """Counts of `column` per bin and status. Scores use [0, 1] (widened to the data's range if it
    goes beyond) in BINS equal bins; n_components uses one bin per integer 0..MAX_COMPONENT_BIN."""
    lo, hi, n = con.execute(
        f"SELECT min({column}), max({column}), count({column}) FROM objects"
    ).fetchone()
    if not n:
        return {"column": column, "bins": [], "n": 0}
    if column == "n_components":
        bins = int(min(hi, MAX_COMPONENT_BIN)) + 1
        lo, hi = 0.0, float(bins)
    else:
        lo, hi, bins = min(0.0, float(lo)), max(1.0, float(hi)), BINS
    width = (hi - lo) / bins
    rows = con.execute(
        f"SELECT least(greatest(floor(({column} - ?) / ?), 0), ?)::INT AS b, status, count(*) "
        f"FROM objects WHERE {column} IS NOT NULL GROUP BY ALL",
        [lo, width, bins - 1],
    ).fetchall()
    counts = [{s: 0 for s in GROUPS} for _ in range(bins)]
    for b, status, c in rows:
        counts[b][status] = c
    edges = [lo + k * width for k in range(bins + 1)]
    return {"column": column, "n": n, "edges": edges, "bins": counts}


def category_table(con: duckdb.DuckDBPyConnection, limit: int = 300) -> list[tuple]:
    """(category, objects, kept share, mean box_iou, an example caption of a kept object)."""
    return con.execute(
        """
        SELECT coalesce(category, '(none)') AS category, count(*) AS objects,
            avg(keep::INT) AS kept_share, avg(box_iou) AS mean_box_iou,
            arg_min(captions[1].text, object_id) FILTER (WHERE keep AND len(captions) > 0)
        FROM objects GROUP BY 1 ORDER BY objects DESC, category LIMIT ?
        """,
        [limit],
    ).fetchall()


def overview(con: duckdb.DuckDBPyConnection, run: Run) -> dict:
    """The run at a glance: counts from the shards, provenance, throughput from the manifest."""
    m = run.manifest
    n, kept, filtered, rejected = con.execute(
        "SELECT count(*), count(*) FILTER (status = 'kept'), count(*) FILTER (status = 'filtered'),"
        " count(*) FILTER (status = 'rejected') FROM objects"
    ).fetchone()
    images, images_ok = con.execute(
        "SELECT count(*), count(*) FILTER (status = 'ok') FROM images"
    ).fetchone()
    origins = con.execute(
        "SELECT coalesce(mask_origin, '(none)'), count(*) FROM objects GROUP BY 1 ORDER BY 2 DESC"
    ).fetchall()
    caption_prov = con.execute(
        "SELECT provenance, count(*), avg(score) FROM captions GROUP BY 1 ORDER BY 2 DESC"
    ).fetchall()
    codes = con.execute(
        "SELECT status, reject_code, count(*) FROM objects WHERE NOT keep "
        "GROUP BY ALL ORDER BY 3 DESC, 2"
    ).fetchall()
    wall = wall_seconds(m)
    return {
        "input": (m.get("plan") or {}).get("objects", n),
        "objects": n,
        "kept": kept,
        "filtered": filtered,
        "rejected": rejected,
        "images": images,
        "images_ok": images_ok,
        "origins": origins,
        "caption_provenance": caption_prov,
        "codes": codes,
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------ gallery cards


def _card(run: Run, image: dict, objects: list[dict], n: int, build: Path, cfg: ReportConfig):
    """Draw one sampled image (overlays via pipelines.render) into thumbs/ and large/."""
    name = f"{n:04d}.jpg"
    drawn_path = build / f".drawn-{name}"
    try:
        render(run.root, image["file_path"], objects, drawn_path)
        drawn = cv2.imread(str(drawn_path))
        drawn_path.unlink()
    except FileNotFoundError as exc:
        drawn = cv2.cvtColor(placeholder(str(exc), 300, 400), cv2.COLOR_RGB2BGR)
    for folder, side in (("thumbs", cfg.thumb), ("large", cfg.large)):
        if not cv2.imwrite(str(build / folder / name), fit(drawn, side)):
            raise ValueError(f"cannot write {build / folder / name}")
    return {"image": image, "objects": objects, "file": name}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _card_html(card: dict) -> str:
    image, e = card["image"], html.escape
    items = []
    for k, obj in enumerate(card["objects"]):
        colour = "rgb({},{},{})".format(*object_colour(k, obj["status"]))
        code = obj["reject_code"] or ""
        caps = "".join(
            f"<li><q>{e(c['text'])}</q> <span class=sub>{e(c['provenance'])}, "
            f"{_fmt(c['score'], 2)}</span></li>"
            for c in obj["captions"] or []
        )
        scores = " · ".join(f"{c} {_fmt(obj[c])}" for c in QUALITY)
        detail = e(obj["reject_reason"] or "")
        reason = f"<div class=reason>[{e(code)}] {detail}</div>" if code else ""
        items.append(
            f'<li class=obj style="border-left-color:{colour}" data-category="'
            f'{e(obj["category"] or "")}" data-status="{obj["status"]}" data-code="{e(code)}" '
            f'data-origin="{e(obj["mask_origin"] or "")}"><b>{e(obj["category"] or "(none)")}</b>'
            f' <span class="status-{obj["status"]}">{obj["status"]}</span> '
            f'<span class=sub>{e(obj["mask_origin"] or "no mask")}</span>{reason}'
            f"<div class=scores>{scores}</div><ul class=caps>{caps}</ul></li>"
        )
    status = image["image_status"]
    error = f" <span class=bad>{e(image['error'] or '')}</span>" if status != "ok" else ""
    return (
        f'<div class=card data-image-id="{e(image["image_id"])}" data-group="{image["group"]}">'
        f'<img src="thumbs/{card["file"]}" data-large="large/{card["file"]}" '
        f'alt="{e(image["image_id"])}"><div class=meta>{e(image["image_id"])} · '
        f"{e(image['file_path'])} · image {e(status)}{error} · {len(card['objects'])} objects"
        f"</div><ul>{''.join(items)}</ul></div>"
    )


# ---------------------------------------------------------------------------------- the page


def _page(run: Run, con: duckdb.DuckDBPyConnection, cards: list[dict]) -> str:
    ov = overview(con, run)
    quality = (run.manifest.get("config") or {}).get("quality") or {}
    hists = "".join(_histogram_svg(histogram(con, c), _threshold(c, quality)) for c in QUALITY)
    css = resources.files("pipelines").joinpath("report_assets/report.css").read_text()
    js = resources.files("pipelines").joinpath("report_assets/report.js").read_text()
    e = html.escape
    source = run.manifest.get("source") or {}
    title = f"mqengine report · {source.get('name', '?')} · run {run.run_id}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{e(title)}</title><style>{css}</style></head>
<body>
<h1>{e(title)}</h1>
<div class=sub>{e(str(run.dir))} · schema {e(run.schema_version)}</div>
<pre id="js-errors"></pre>
{_overview_html(ov, run)}
<h2>Quality scores</h2>
<div class=legend>{_legend()} <span>dashed line: the run's threshold</span></div>
<div class=hists>{hists}</div>
<h2>Categories</h2>
{_category_html(con)}
<h2>Gallery</h2>
{_filters_html(cards)}
<div class=gallery id=gallery>{"".join(_card_html(c) for c in cards)}</div>
<div id=lightbox><img alt=""></div>
<script>{js}</script>
</body></html>
"""


def _threshold(column: str, quality: dict) -> float | None:
    key, is_min = QUALITY[column]
    value = quality.get(key)
    if value is None or (not is_min and value == 0):  # max_components 0 means "any"
        return None
    # n_components fails above the maximum: the line sits where the failing bins start
    return float(value) if is_min else float(value) + 1


def _overview_html(ov: dict, run: Run) -> str:
    e = html.escape
    adds_up = ov["input"] == ov["kept"] + ov["filtered"] + ov["rejected"]
    check = "<span class=ok>✓</span>" if adds_up else "<span class=bad>✗ does not add up</span>"
    rate = ""
    if ov["wall_s"]:
        rate = f"{ov['objects'] / ov['wall_s']:.1f} objects/s over {ov['wall_s']:.0f} s"
    stats = [
        ("input objects", ov["input"]),
        ("kept", ov["kept"]),
        ("filtered", ov["filtered"]),
        ("rejected", ov["rejected"]),
        ("images", ov["images"]),
        ("images bad", ov["images"] - ov["images_ok"]),
    ]
    boxes = "".join(f'<div class=stat data-stat="{k}"><b>{v}</b>{k}</div>' for k, v in stats)
    source = run.manifest.get("source") or {}
    config = run.manifest.get("config") or {}
    masker = (config.get("masker") or {}).get("name", "?")
    captioner = (config.get("captioner") or {}).get("name", "?")
    return f"""<h2>The run at a glance</h2>
<div>source <b>{e(str(source.get('name')))}</b> split {e(str(source.get('split')))} ·
root {e(str(source.get('root')))} · masker <b>{e(masker)}</b> · captioner <b>{e(captioner)}</b>
{('· ' + rate) if rate else ''}</div>
<div class=stats>{boxes}</div>
<div>input {ov['input']} = kept {ov['kept']} + filtered {ov['filtered']} + rejected
{ov['rejected']} {check}</div>
<div class=row><div><h3>Mask provenance</h3>
{_table(("mask_origin", "objects"), ov["origins"], "origins")}</div>
<div><h3>Caption provenance</h3>
{_table(("provenance", "captions", "mean score"), ov["caption_provenance"], "captions")}</div>
<div><h3>Not kept, by reject code</h3>
{_table(("status", "reject_code", "objects"), ov["codes"], "codes")}</div></div>
<details><summary>config</summary><pre class=config>{e(json.dumps(config, indent=1))}</pre>
</details>"""


def _table(header: tuple, rows: list[tuple], name: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows
    ) or f"<tr><td colspan={len(header)}>none</td></tr>"
    return f'<table data-table="{name}"><tr>{head}</tr>{body}</table>'


def _cell(value) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<td class=num>{_fmt(value)}</td>"
    return f"<td>{html.escape(_fmt(value))}</td>"


def _category_html(con: duckdb.DuckDBPyConnection, limit: int = 300) -> str:
    rows = category_table(con, limit)
    total = con.execute("SELECT count(DISTINCT coalesce(category, '')) FROM objects").fetchone()[0]
    note = ""
    if total > limit:
        note = f"<div class=sub>the {limit} largest of {total} categories</div>"
    header = ("category", "objects", "kept share", "mean box_iou", "example caption")
    return f"{note}<div class=scroll>{_table(header, rows, 'categories')}</div>"


def _legend() -> str:
    return "".join(
        f'<span><i class=sw style="background:{c}"></i>{s}</span>'
        for s, c in STATUS_COLOURS.items()
    )


def _histogram_svg(hist: dict, threshold: float | None) -> str:
    """Stacked bars (kept, filtered, rejected) per bin; every bar carries its counts as data
    attributes, so tests read the numbers back from the page itself."""
    column = hist["column"]
    if not hist["n"]:
        return (f'<div class=hist data-column="{column}"><h3>{column}</h3>'
                "<div class=sub>no values (the masker gives none)</div></div>")
    w, h, pad = 300, 130, 22
    edges, bins = hist["edges"], hist["bins"]
    peak = max(sum(b.values()) for b in bins) or 1
    bar_w = (w - 2 * pad) / len(bins)
    lo, hi = edges[0], edges[-1]

    def x_of(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * (w - 2 * pad)

    parts = []
    for k, counts in enumerate(bins):
        y = h - pad
        data = " ".join(f'data-{s}="{counts[s]}"' for s in GROUPS)
        parts.append(f'<g class=bin data-lo="{edges[k]:.6g}" data-hi="{edges[k + 1]:.6g}" {data}>')
        for s in GROUPS:
            bh = counts[s] / peak * (h - 2 * pad)
            if bh > 0:
                y -= bh
                parts.append(
                    f'<rect x="{pad + k * bar_w:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}"'
                    f' height="{bh:.1f}" fill="{STATUS_COLOURS[s]}"/>'
                )
        parts.append("</g>")
    line, label = "", ""
    if threshold is not None:
        tx = x_of(min(max(threshold, lo), hi))
        line = (f'<line class=threshold x1="{tx:.1f}" x2="{tx:.1f}" y1="{pad - 8}" y2="{h - pad}"'
                ' stroke="#000" stroke-width="1.5" stroke-dasharray="4 3"/>')
        label = f'<text x="{tx + 3:.1f}" y="{pad - 1}" font-size="10">{threshold:g}</text>'
    axis = (f'<text x="{pad}" y="{h - 6}" font-size="10">{lo:g}</text>'
            f'<text x="{w - pad}" y="{h - 6}" font-size="10" text-anchor="end">{hi:g}</text>'
            f'<text x="{w / 2}" y="{h - 6}" font-size="10" text-anchor="middle">'
            f"n = {hist['n']}, peak {peak}</text>")
    thr = "" if threshold is None else f' data-threshold="{threshold:g}"'
    return (f'<div class=hist data-column="{column}"{thr}><h3>{column}</h3>'
            f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(parts)}{line}{label}'
            f"{axis}</svg></div>")


def _filters_html(cards: list[dict]) -> str:
    cats, statuses, codes, origins = set(), set(), set(), set()
    for card in cards:
        for obj in card["objects"]:
            cats.add(obj["category"] or "")
            statuses.add(obj["status"])
            if obj["reject_code"]:
                codes.add(obj["reject_code"])
            origins.add(obj["mask_origin"] or "")
    status_opts = [(s, s) for s in GROUPS if s in statuses]
    status_opts += [(f"code:{c}", f"reject code {c}") for c in sorted(codes)]

    def select(name: str, label: str, options: list[tuple[str, str]]) -> str:
        opts = "".join(
            f'<option value="{html.escape(v)}">{html.escape(t or "(none)")}</option>'
            for v, t in options
        )
        return f'<label>{label} <select id="f-{name}"><option value="">all</option>{opts}</select>'

    return (
        "<div class=filters>"
        + select("category", "category", [(c, c) for c in sorted(cats)])
        + "</label>" + select("status", "status", status_opts) + "</label>"
        + select("origin", "mask_origin", [(o, o) for o in sorted(origins)]) + "</label>"
        + f"<span><b id=shown>{len(cards)}</b> of {len(cards)} sampled images shown</span></div>"
    )
