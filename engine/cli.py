"""The `engine` command line: synthesize | query | stats | export | show (COMMANDS at the bottom).

Only this package parses flags. Each command turns its flags into the config dataclass of the code
it runs. A user error (bad flag value, missing file, malformed input) exits with code 2 and one line
that says what is wrong; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.query import FORMATS, connect, format_rows, run_query, stats
from engine.train_commands import eval_command, train_command
from pipelines.captioners import CAPTIONERS, CaptionerConfig
from pipelines.maskers import MASKERS, MaskerConfig
from pipelines.quality import QualityConfig
from pipelines.sources import SOURCES, SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from schemas import SchemaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn bbox-only detection datasets into mask + caption Parquet shards, and query them.",
)
console = Console(stderr=True)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, SchemaError, PermissionError)


def _choice(names) -> str:
    return ", ".join(names)


def synthesize(
    source: Annotated[str, typer.Option(help=f"Annotation source: {_choice(SOURCES)}.")] = "demo",
    out: Annotated[Path, typer.Option(help="Output folder (created; a rerun resumes it).")] = Path(
        "runs/demo"
    ),
    root: Annotated[
        Path | None,
        typer.Option(
            help="Dataset root: images (and, for objects365, the annotation files) live under it."
        ),
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="Annotation file (overrides the one found under --root).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split name, e.g. train or val.")] = None,
    bbox_format: Annotated[
        str, typer.Option(help="hf source: box convention of `objects.bbox` (xywh, xyxy, auto).")
    ] = "auto",
    masker: Annotated[
        str, typer.Option(help=f"Box->mask method: {_choice(MASKERS)}, or module:builder.")
    ] = "grabcut",
    captioner: Annotated[
        str, typer.Option(help=f"Captioner: {_choice(CAPTIONERS)}, or module:builder.")
    ] = "template",
    unit_size: Annotated[int, typer.Option(help="Images per work unit (= per shard).")] = 64,
    workers: Annotated[int, typer.Option(help="Parallel workers; 0 = one per CPU or GPU.")] = 0,
    executor: Annotated[str, typer.Option(help="ray, or local (one process, no Ray).")] = "ray",
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting a local one.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    remask: Annotated[
        bool,
        typer.Option(
            help="Run the masker on objects that already have a "
            "ground-truth mask too (kept in gt_mask)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an output folder written with a different configuration.")
    ] = False,
    sam_checkpoint: Annotated[
        Path | None, typer.Option(help="segment-anything checkpoint.")
    ] = None,
    sam_model: Annotated[
        str, typer.Option(help="SAM variant: vit_b, vit_l, vit_h (tiny: tests).")
    ] = "vit_b",
    mask_model: Annotated[Path | None, typer.Option(help="transformers SAM/SAM2 folder.")] = None,
    caption_model: Annotated[
        Path | None, typer.Option(help="transformers captioner folder.")
    ] = None,
    captions_per_object: Annotated[int, typer.Option(help="Captions kept per object.")] = 5,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (models only).")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="Model compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16.")
    ] = "auto",
    multimask: Annotated[
        bool, typer.Option(help="SAM family: pick the best of 3 candidate masks by predicted IoU.")
    ] = True,
    min_region_area: Annotated[
        int, typer.Option(help="SAM family: remove islands and fill holes under this many pixels.")
    ] = 0,
    box_chunk: Annotated[
        int, typer.Option(help="SAM family: most boxes of one image decoded together.")
    ] = 64,
    caption_batch_size: Annotated[
        int, typer.Option(help="Model captioners: crops per generate() call.")
    ] = 16,
    caption_max_tokens: Annotated[
        int, typer.Option(help="Model captioners: most new tokens per caption.")
    ] = 30,
    min_box_iou: Annotated[
        float,
        typer.Option(help="Keep masks whose tight box has at least this IoU with the prompt box."),
    ] = 0.5,
    min_box_fill: Annotated[
        float, typer.Option(help="... and cover at least this fraction of the box.")
    ] = 0.05,
    max_components: Annotated[
        int, typer.Option(help="... and have at most this many connected components (0 = any).")
    ] = 0,
    min_pred_iou: Annotated[
        float,
        typer.Option(
            help="... and a model-predicted IoU of at least this (when the masker predicts one)."
        ),
    ] = 0.88,
    min_stability: Annotated[
        float,
        typer.Option(
            help="... and a stability score of at least this (when the masker gives one)."
        ),
    ] = 0.95,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Synthesize masks and captions for every box of a detection dataset into Parquet shards."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    cfg = SynthesizeConfig(
        source=SourceConfig(source, root, annotations, split, bbox_format),
        out=out,
        masker=MaskerConfig(
            name=masker,
            sam_checkpoint=sam_checkpoint,
            sam_model=sam_model,
            mask_model=mask_model,
            device=device,
            dtype=dtype,
            multimask=multimask,
            min_region_area=min_region_area,
            box_chunk=box_chunk,
        ),
        captioner=CaptionerConfig(
            name=captioner,
            caption_model=caption_model,
            captions_per_object=captions_per_object,
            device=device,
            dtype=dtype,
            caption_batch_size=caption_batch_size,
            caption_max_tokens=caption_max_tokens,
        ),
        quality=QualityConfig(
            min_box_iou, min_box_fill, max_components, min_pred_iou, min_stability
        ),
        unit_size=unit_size,
        limit=limit,
        remask=remask,
        executor=executor,
        workers=workers,
        ray_address=ray_address,
        overwrite=overwrite,
    )
    summary = _run_with_progress(cfg)
    _print_summary(summary)


def _run_with_progress(cfg: SynthesizeConfig):
    columns = (
        TextColumn("[bold]synthesize"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    start, seen = time.monotonic(), {"images": 0, "objects": 0}
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("units", total=None, rate="planning...")

        def on_unit(entry: dict) -> None:
            seen["images"] += entry["counts"]["images"]
            seen["objects"] += entry["counts"]["objects"]
            dt = max(time.monotonic() - start, 1e-9)
            rate = f"{seen['images'] / dt:.1f} images/s, {seen['objects'] / dt:.1f} objects/s"
            progress.update(task, advance=1, rate=rate)

        def started(total: int, done: int) -> None:
            progress.update(task, total=total, completed=done, rate="starting workers...")

        return run(cfg, on_unit=on_unit, on_start=started)


def _print_summary(summary) -> None:
    t = summary.totals
    table = Table(title=f"{summary.out}  (run {summary.run_id})")
    for col in ("images", "images bad", "objects", "kept", "filtered", "rejected"):
        table.add_column(col, justify="right")
    table.add_row(
        *(
            str(t.get(k, 0))
            for k in ("images", "images_bad", "objects", "kept", "filtered", "rejected")
        )
    )
    console.print(table)
    console.print(
        f"units: {summary.units_written} written, {summary.units_skipped} already done "
        f"(of {summary.units_total}); input objects {summary.input_objects} = kept {t['kept']} + "
        f"filtered {t['filtered']} + rejected {t['rejected']}"
    )
    if summary.input_objects != t["kept"] + t["filtered"] + t["rejected"]:
        raise RuntimeError("object counts do not add up; this is a bug, please report it")


def query(
    out: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
    sql: Annotated[str, typer.Argument(help="SQL over the views images, objects, captions.")],
    format: Annotated[str, typer.Option("--format", help=f"{_choice(FORMATS)}")] = "table",
) -> None:
    """Run SQL over an output folder (DuckDB views: images, objects, captions)."""
    if format not in FORMATS:
        raise ValueError(f"unknown --format {format!r}; choose one of: {_choice(FORMATS)}")
    columns, rows = run_query(out, sql)
    if format == "table":
        Console().print(_table(columns, rows))
    else:
        sys.stdout.write(format_rows(columns, rows, format))


def _table(columns: list[str], rows: list[tuple], title: str | None = None) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(("" if v is None else str(v)) for v in r))
    return table


def stats_command(
    out: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
) -> None:
    """Counts by source, status, mask provenance, reject reason, category and caption provenance."""
    out_console = Console()
    for title, (columns, rows) in stats(out).items():
        out_console.print(_table(columns, rows, title))


def export(
    out: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
    dest: Annotated[Path, typer.Option("--to", help="COCO JSON file to write.")],
    where: Annotated[
        str,
        typer.Option(
            help="SQL condition on objects selecting what to "
            "export ('true' for everything with a mask)."
        ),
    ] = "keep",
) -> None:
    """Export objects as COCO-format JSON (RLE segmentation; provenance and captions as extra
    keys)."""
    from pipelines.export import export_coco

    counts = export_coco(connect(out), dest, where)
    console.print(
        f"wrote {dest}: {counts['images']} images, {counts['annotations']} annotations, "
        f"{counts['categories']} categories"
    )


def show(
    out: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
    dest: Annotated[Path, typer.Option("--to", help="PNG file to write.")] = Path("show.png"),
    image_id: Annotated[
        str | None, typer.Option(help="Image to draw (default: the first one with objects).")
    ] = None,
) -> None:
    """Draw one image with its masks, boxes and first captions into a PNG."""
    from pipelines.render import render
    from pipelines.shards import Manifest

    manifest = Manifest.load(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}: no manifest.json (is it an output folder?)")
    con = connect(out)
    if image_id is None:
        first = con.execute(
            "SELECT min(image_id) FROM images WHERE status = 'ok' AND num_objects > 0"
        )
        image_id = first.fetchone()[0]
    row = con.execute("SELECT file_path FROM images WHERE image_id = ?", [image_id]).fetchone()
    if row is None:
        raise ValueError(f"no image {image_id!r} in {out}")
    cursor = con.execute("SELECT * FROM objects WHERE image_id = ? ORDER BY object_id", [image_id])
    columns = [d[0] for d in cursor.description]
    objects = [dict(zip(columns, r, strict=True)) for r in cursor.fetchall()]
    render(Path(manifest.data["source"]["root"]), row[0], objects, dest)
    console.print(f"wrote {dest}: {image_id} with {len(objects)} objects")


COMMANDS = {
    "synthesize": synthesize,
    "query": query,
    "stats": stats_command,
    "export": export,
    "show": show,
    "train": train_command,
    "eval": eval_command,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `engine` script; returns the exit code (tests call it directly)."""
    try:
        # typer turns Ctrl-C (and SIGTERM, which the synthesize driver raises as Ctrl-C) into a
        # returned 130 rather than an exception.
        if app(args=argv, standalone_mode=False, prog_name="engine") == 130:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        console.print("interrupted; the same command resumes the run")
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        console.print("aborted")
        return 130
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
