"""The `engine` command line: synthesize | query | stats | export | show | report | train | eval |
predict (COMMANDS at the bottom).

Only this package parses flags. Each command turns its flags into the config dataclass of the code
it runs. A user error (bad flag value, missing file, malformed input) exits with code 2 and one line
that says what is wrong; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
import typer._click.exceptions as typer_click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.options import SYNTHESIZE_FLAGS, synthesize_config
from engine.options import signature as options_signature
from engine.predict_commands import predict_command
from engine.progress import reporter
from engine.query import (
    FORMATS,
    STATS_FORMATS,
    format_rows,
    run_query,
    stats,
    stats_json,
)
from engine.report_commands import report_command, show_command
from engine.train_commands import eval_command, train_command
from pipelines.export import EXPORTERS
from pipelines.synthesize import SynthesizeConfig, run
from schemas import SCHEMA_VERSION, SchemaError
from schemas.runs import open_run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn bbox-only detection datasets into mask + caption Parquet shards, and query them.",
)
console = Console(stderr=True)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, SchemaError, PermissionError)
# typer 0.29 raises its own copies of click's exception classes (typer._click); click's own are
# kept for code that raises them directly.
CLICK_EXIT = (typer.Exit, click.exceptions.Exit)
CLICK_ABORT = (typer.Abort, click.exceptions.Abort)
CLICK_HELP = (typer_click.NoArgsIsHelpError, click.exceptions.NoArgsIsHelpError)
CLICK_NO_SUCH_OPTION = (typer_click.NoSuchOption, click.exceptions.NoSuchOption)
CLICK_USAGE = (typer_click.UsageError, click.exceptions.UsageError)
CLICK_ERRORS = (typer_click.ClickException, click.ClickException)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(value: object) -> str:
    """`value` as text that rich prints verbatim: markup escaped, control characters (ANSI escape
    sequences from data) shown as \\xNN instead of reaching the terminal."""
    text = CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return escape(text)


def _choice(names) -> str:
    return ", ".join(names)


def synthesize(**flags) -> None:
    """Synthesize masks and captions for every box of a detection dataset into Parquet shards."""
    logging.basicConfig(level=logging.INFO if flags["verbose"] else logging.WARNING)
    summary = _run_with_progress(synthesize_config(flags))
    _print_summary(summary)


# the flags, their types and defaults come from the config dataclasses (engine/options.py)
synthesize.__signature__ = options_signature(SYNTHESIZE_FLAGS)


def _run_with_progress(cfg: SynthesizeConfig):
    progress = reporter(console)  # checks MQENGINE_PROGRESS_INTERVAL before any work
    try:
        return run(cfg, on_unit=progress.on_unit, on_start=progress.on_start)
    finally:
        progress.close()


def _print_summary(summary) -> None:
    t = summary.totals
    table = Table(title=plain(f"{summary.out}  (run {summary.run_id})"))
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
    table = Table(title=title and plain(title))
    for c in columns:
        table.add_column(plain(c))
    for r in rows:
        table.add_row(*(("" if v is None else plain(v)) for v in r))
    return table


def stats_command(
    out: Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")],
    format: Annotated[str, typer.Option("--format", help=f"{_choice(STATS_FORMATS)}")] = "table",
) -> None:
    """Counts by source, status, mask provenance, reject code, category and caption provenance."""
    if format not in STATS_FORMATS:
        raise ValueError(f"unknown --format {format!r}; choose one of: {_choice(STATS_FORMATS)}")
    report = stats(out)
    if format == "json":
        sys.stdout.write(stats_json(report))
        return
    out_console = Console()
    for title, (columns, rows) in report.items():
        out_console.print(_table(columns, rows, title))


RUN_DIR = Annotated[Path, typer.Argument(help="An `engine synthesize` output folder.")]
IMAGE_ROOT = Annotated[
    Path | None,
    typer.Option(help="Image root to use instead of the one the run recorded (the data moved)."),
]


def export(
    out: RUN_DIR,
    dest: Annotated[Path, typer.Option("--to", help="File to write.")],
    format: Annotated[str, typer.Option("--format", help=f"{_choice(EXPORTERS)}")] = "coco",
    where: Annotated[
        str,
        typer.Option(
            help="One SQL condition on objects selecting what to "
            "export ('true' for everything with a mask)."
        ),
    ] = "keep",
    root: IMAGE_ROOT = None,
) -> None:
    """Export objects to another format (coco: the source's ids, RLE masks, a score per mask).

    coco: ids are the source's (renumbered only when they are not unique integers, as the file's
    info.ids says); score = pred_iou where the masker predicts one, else box_iou; provenance, scores
    and captions travel as extra annotation keys."""
    exporter = EXPORTERS.get(format)
    if exporter is None:
        raise ValueError(f"unknown --format {format!r}; choose one of: {_choice(EXPORTERS)}")
    counts = exporter(open_run(out, root=root), dest, where)
    summary = ", ".join(f"{n} {what}" for what, n in counts.items())
    console.print(f"wrote {plain(dest)}: {plain(summary)}")


COMMANDS = {
    "synthesize": synthesize,
    "query": query,
    "stats": stats_command,
    "export": export,
    "show": show_command,
    "report": report_command,
    "train": train_command,
    "eval": eval_command,
    "predict": predict_command,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def version_text() -> str:
    try:
        version = importlib.metadata.version("mqengine")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "unknown (not installed)"
    return f"mqengine {version}, schema {SCHEMA_VERSION}"


def _show_version(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True,
            help="Print the engine and schema versions and exit.",
        ),
    ] = False,
) -> None:
    """Options of `engine` itself (the app's help text is given to typer.Typer)."""


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
    except CLICK_EXIT as exc:
        return exc.exit_code
    except CLICK_HELP as exc:  # bare `engine` or a bare group: the help, as click prints it
        exc.show()
        return 2
    except CLICK_USAGE as exc:
        _error(_usage_message(exc))
        return 2
    except CLICK_ERRORS as exc:
        _error(exc.format_message())
        return exc.exit_code
    except CLICK_ABORT:
        console.print("aborted")
        return 130
    except USER_ERRORS as exc:
        _error(str(exc))
        return 2
    return 0


def _usage_message(exc) -> str:
    """One line for a usage mistake: click's message, the option most likely meant, and the help
    command to run."""
    message = exc.format_message()
    if isinstance(exc, CLICK_NO_SUCH_OPTION) and exc.possibilities:
        best = difflib.get_close_matches(exc.option_name, exc.possibilities, n=1, cutoff=0)
        message = f"{exc.message} (did you mean {best[0]}?)"
    if exc.ctx is not None:
        message = f"{message.rstrip('.')} (try '{exc.ctx.command_path} --help')"
    return message


def _error(message: str) -> None:
    """Print `error: message` as one line on stderr; the message may hold user data, so it is
    printed escaped (no markup, no terminal control sequences)."""
    one_line = " ".join(message.splitlines())
    console.print(f"[red]error:[/red] {plain(one_line)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
