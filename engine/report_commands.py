"""`engine report` and `engine show`: look at what a run synthesized.

    engine report runs/demo                      # runs/demo/report/index.html (opens from disk)
    engine report runs/demo --sample 48 --seed 1 --out /tmp/demo-report
    engine show runs/demo --to show.png          # one image
    engine show runs/demo --grid 16 --to sheet.png   # a contact sheet of 16 sampled images

Both read the run through schemas.runs.open_run and engine.query.connect, and raise
ValueError/FileNotFoundError for user errors (engine/cli.py's main() prints one line, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.query import connect
from schemas.runs import open_run

console = Console(stderr=True)


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: RUN_DIR/report).")
    ] = None,
    sample: Annotated[int, typer.Option(help="Images in the gallery.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the (deterministic) image sample.")] = 0,
    root: Annotated[
        Path | None, typer.Option(help="Image root, when the images moved since the run.")
    ] = None,
) -> None:
    """Write a static HTML report (no server, no network) of a run: counts, provenance, quality
    histograms with thresholds, reject codes, categories and a filterable gallery."""
    from pipelines.report import ReportConfig, check_replaceable, write_report

    cfg = ReportConfig(sample=sample, seed=seed)
    run = open_run(run_dir, root=root)
    if out is None and run.fs is not None:  # run.dir is no local folder to write beside
        raise ValueError(f"{run.uri}: the run is on object storage; give --out DIR for the report")
    dest = out if out is not None else run.dir / "report"
    check_replaceable(dest)  # before the progress bar starts: an error stays one line
    columns = (
        TextColumn("[bold]report"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images drawn"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("draw", total=None)

        def on_image(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = write_report(run, dest, cfg, on_image=on_image)
    console.print(f"wrote {escape(str(result['path']))}: {result['images']} sampled images")


def show_command(
    run_dir: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
    dest: Annotated[Path, typer.Option("--to", help="PNG file to write.")] = Path("show.png"),
    image_id: Annotated[
        str | None, typer.Option(help="Image to draw (default: the first one with objects).")
    ] = None,
    grid: Annotated[
        int, typer.Option(help="Draw a contact sheet of N sampled images instead of one.")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the --grid sample.")] = 0,
    root: Annotated[
        Path | None, typer.Option(help="Image root, when the images moved since the run.")
    ] = None,
) -> None:
    """Draw one image (or, with --grid N, N sampled images) with masks, boxes and labels (the
    reject code on every filtered or rejected object) into a PNG."""
    from pipelines.render import render, render_grid
    from pipelines.report import sample_images, sample_objects

    if grid < 0:
        raise ValueError(f"--grid must be 0 (one image) or a number of images, got {grid}")
    run = open_run(run_dir, root=root)
    con = connect(run)
    if grid:
        picked = sample_images(con, grid, seed)
        objects = sample_objects(con, [p["image_id"] for p in picked])
        items = [(p["image_id"], p["file_path"], objects.get(p["image_id"], [])) for p in picked]
        render_grid(run.root, items, dest)
        console.print(f"wrote {escape(str(dest))}: contact sheet of {len(items)} images")
        return
    if image_id is None:
        first = con.execute(
            "SELECT min(image_id) FROM images WHERE status = 'ok' AND num_objects > 0"
        )
        image_id = first.fetchone()[0]
    row = con.execute("SELECT file_path FROM images WHERE image_id = ?", [image_id]).fetchone()
    if row is None:
        raise ValueError(f"no image {image_id!r} in {run_dir}")
    objects = sample_objects(con, [image_id]).get(image_id, [])
    render(run.root, row[0], objects, dest)
    console.print(f"wrote {escape(str(dest))}: {escape(str(image_id))} with {len(objects)} objects")
