"""One pass over a COCO-format JSON document: its top-level arrays element by element.

Why not ijson alone: ijson's `items(prefix)` tokenizes the whole file for each prefix, and a file
whose `categories` come last needs three passes (measured on the 1M-box bench file: 4.1 s for a
pass that builds nothing, 15.8 s for the three; json.load: 11.4 s). Here Python's own C scanner
(`json.decoder.JSONDecoder.scan_once`, what json.load runs) decodes one array element at a time
from a text buffer of CHUNK_CHARS, so the file is read once and memory is one buffer plus one
batch of elements.

An array may also have a bulk reader (`scan(..., bulk=)`): each fresh window is first offered to
it as text, cut after its last '},' (`_bulk_run`); the annotations' reader decodes uniform runs
with msgspec, 2-4x faster than element by element on a 20 MB run of the bench file
(pipelines/sources/rows.py, AnnDecoder).

Only valid JSON takes this path. Any syntax problem (and the NaN/Infinity literals Python accepts
but JSON does not) raises `SyntaxProblem`; the caller then re-reads the file with ijson, whose
messages name the byte offset, line and column (see `stream._items`).
"""

from __future__ import annotations

import gc
import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ijson

CHUNK_CHARS = 1 << 21  # 2 Mi characters per read
_WS = re.compile(r"[ \t\n\r]*")
# Between two array elements.
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
LOOKAHEAD = 1 << 16  # characters kept ahead of the read position

Consumer = Callable[[list, int], None]  # (batch of elements, index of the first one)
# The JSON text of a run of whole elements, comma-separated -> how many it took, or None (it took
# nothing: the scanner decodes that text element by element).
Bulk = Callable[[str], int | None]
BULK_TRIES = 4  # declined bulk runs after which an array is read element by element only


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: millions of small acyclic dicts and records are made
    and dropped, and each collection walks every live one (measured: the 1M-box scan takes 11.8 s
    with it, 9.3 s without). Reference counting still frees them; the previous state returns."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def ijson_backend() -> Any:
    """The fastest installed ijson backend (yajl2_c, a C extension, is ~10x the pure-Python one)."""
    for name in ("yajl2_c", "yajl2_cffi", "yajl2", "python"):
        try:
            return ijson.get_backend(name)
        except ImportError:
            continue
    raise ImportError("no ijson backend could be loaded; pip install ijson")


class SyntaxProblem(Exception):
    """The document is not valid JSON (the reader re-reads it with ijson for the message)."""


def _no_constants(name: str) -> Any:
    raise SyntaxProblem(f"{name} is not JSON")


_scan_once = json.JSONDecoder(parse_constant=_no_constants).scan_once


class _Text:
    """A window of the file's text; `pos` is the read position inside `text`."""

    def __init__(self, f: Any):
        self.f, self.text, self.pos, self.eof = f, "", 0, False

    def more(self) -> None:
        """Drop what was consumed and append at least one more chunk (doubling for large values,
        so an element larger than a chunk costs O(size) overall)."""
        if self.eof:
            raise SyntaxProblem("unexpected end of file")
        chunk = self.f.read(max(CHUNK_CHARS, len(self.text) - self.pos))
        if not chunk:
            self.eof = True
        self.text, self.pos = self.text[self.pos:] + chunk, 0

    def skip_ws(self) -> str:
        """The next non-blank character (reading more as needed); '' at the end of the file."""
        while True:
            self.pos = _WS.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.more()

    def value(self) -> Any:
        """Decode the value at `pos`; retried with more text while it may just be cut off."""
        while True:
            try:
                value, end = _scan_once(self.text, self.pos)
            except (StopIteration, json.JSONDecodeError) as e:
                if self.eof or not _cut(e, self.text):
                    raise SyntaxProblem(str(e)) from None
                self.more()
                continue
            except RecursionError:
                value, end = _deep_value(self, self.pos)
            if end == len(self.text) and not self.eof:
                # A number at the very end of the window may go on in the next chunk.
                self.more()
                continue
            self.pos = end
            return value

    def expect(self, char: str) -> None:
        if self.skip_ws() != char:
            raise SyntaxProblem(f"expected {char!r}")
        self.pos += 1


def scan(path: Path, arrays: dict[str, Consumer], keep: tuple[str, ...], batch: int,
         bulk: dict[str, Bulk] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Read `path` once. Elements of the top-level arrays named in `arrays` go to their consumer
    in lists of `batch`; the values of the keys in `keep` are returned whole. Also returns each
    top-level key's JSON type ('array', 'object', ...), for the caller's checks.

    `bulk`: for an array, a faster reader of runs of its elements as text (see `_bulk_run`); the
    elements it declines go to the consumer as usual, in file order with the rest."""
    kept: dict[str, Any] = {}
    types: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:  # no newline translation: bytes as written
        t = _Text(f)
        t.expect("{")
        if t.skip_ws() == "}":
            t.pos += 1
        else:
            while True:
                if t.skip_ws() != '"':
                    raise SyntaxProblem("expected a key")
                key = t.value()
                t.expect(":")
                first = t.skip_ws()
                types[key] = _TYPES.get(first, "value")
                if key in arrays and first == "[":
                    t.pos += 1
                    _array(t, arrays[key], batch, (bulk or {}).get(key))
                else:
                    value = t.value()
                    if key in keep:
                        kept[key] = value
                    del value  # not kept: dropped as soon as it is read
                t.skip_ws()
                if t.text[t.pos:t.pos + 1] == ",":
                    t.pos += 1
                    continue
                t.expect("}")
                break
        if t.skip_ws() != "":
            raise SyntaxProblem("text after the top-level object")
    return kept, types


_TYPES = {"[": "array", "{": "object", '"': "string"}


def _cut(error: Exception, text: str) -> bool:
    """Whether a failed scan may only have run out of text (then more is read and the scan
    retried), rather than met bad JSON: the scanner stops at the window's end, or inside a
    literal or number cut there, or in a string whose closing quote is not yet read. Bad JSON
    in the middle of a large file is reported at once instead of reading the rest into memory."""
    if isinstance(error, StopIteration):
        return error.value >= len(text) - 16
    return error.msg.startswith("Unterminated string") or error.pos >= len(text) - 16


# A JSON string, a lone quote (a string the window cuts), or a bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{}]')


def _deep_value(t: _Text, pos: int) -> tuple[Any, int]:
    """A value nested too deeply for the C scanner (it recurses; a 20k-deep segmentation has been
    seen): its end found by counting brackets outside strings, then decoded by ijson's C backend,
    which keeps its own stack. Returns the value and its end in `t.text`; `t.pos` is its start
    (the window may have moved)."""
    while True:
        depth = 0
        for m in _TOKENS.finditer(t.text, pos):
            token = m.group()
            if token == '"' and m.end() - m.start() == 1:
                break  # a string the window cuts: read more
            if token in "[{":
                depth += 1
            elif token in "]}":
                depth -= 1
                if depth == 0:
                    t.pos = pos  # the value's start in the (possibly moved) window
                    text = io.BytesIO(t.text[pos:m.end()].encode("utf-8"))
                    try:
                        return next(ijson_backend().items(text, "", use_float=True)), m.end()
                    except (ijson.JSONError, StopIteration) as e:
                        raise SyntaxProblem(str(e)) from None
        if t.eof:
            raise SyntaxProblem("unterminated value")
        t.pos = pos
        t.more()
        pos = t.pos


def _bulk_run(text: str, pos: int, bulk: Bulk) -> tuple[int, int] | None:
    """Hand `bulk` the elements from `pos` (an element's start) to the last '},' of the window;
    when it took them, how many and the position after that ',' and its blanks; else None.

    Why the cut is safe: `bulk` parses "[" + text + "]" as strict JSON. Lexing from an element's
    start, a '}' inside a string leaves that string open at the cut, and one inside a nested
    value leaves a bracket open: either way that text is not valid JSON, and `bulk` declines it.
    So a run it takes ends exactly after a whole element.
    """
    cut = text.rfind("},", pos)
    if cut <= pos:
        return None
    taken = bulk(text[pos:cut + 1])
    if taken is None:
        return None
    return taken, _SEP.match(text, cut + 1).end()


def _array(t: _Text, consumer: Consumer, batch: int, bulk: Bulk | None = None) -> None:
    """Elements of the array whose '[' was just read, in lists of `batch`.

    The hot loop of the reader (once per box): locals only, one C scan and one regex match per
    element; the window is refilled when fewer than LOOKAHEAD characters are left, so an element
    is almost never cut at its end (when it is, the scan fails or ends at the window's end, and
    is retried with more text). With `bulk`, each fresh window is first offered to it whole
    (`_bulk_run`); what it declines is read here, and it is offered the next window again, until
    it has declined BULK_TRIES times.
    """
    items: list = []
    done = 0
    if t.skip_ws() == "]":
        t.pos += 1
        return
    scan_once, sep = _scan_once, _SEP.match
    text, pos = t.text, t.pos
    limit = len(text) - LOOKAHEAD
    offered, declined = None, 0  # the window last offered to bulk (each refill makes a new one)
    while True:
        if pos > limit and not t.eof:
            t.pos = pos
            t.more()
            t.skip_ws()  # the blanks after a ',' may have been cut by the window
            text, pos = t.text, t.pos
            limit = len(text) - LOOKAHEAD
        if bulk is not None and text is not offered and declined < BULK_TRIES:
            offered = text
            if items:  # flushed first: file order is kept
                consumer(items, done)
                done += len(items)
                items = []
            run = _bulk_run(text, pos, bulk)
            if run is None:
                declined += 1
            else:
                done += run[0]
                pos = run[1]
                limit = -1  # refill now: the window is used up
                continue
        try:
            value, end = scan_once(text, pos)
        except (StopIteration, json.JSONDecodeError) as e:
            if t.eof or not _cut(e, text):
                raise SyntaxProblem(str(e)) from None
            end = -1
        except RecursionError:
            value, end = _deep_value(t, pos)
            text, pos, limit = t.text, t.pos, len(t.text) - LOOKAHEAD
        if end < 0 or (end == len(text) and not t.eof):  # cut off, or may go on past the window
            t.pos = pos
            t.more()
            t.skip_ws()  # the blanks after a ',' may have been cut by the window
            text, pos = t.text, t.pos
            limit = len(text) - LOOKAHEAD
            continue
        items.append(value)
        if len(items) >= batch:
            consumer(items, done)
            done += len(items)
            items = []
        m = sep(text, end)
        if m is not None:
            pos = m.end()
            continue
        t.pos = end
        if _close(t):
            break
        text, pos = t.text, t.pos
        limit = len(text) - LOOKAHEAD
    if items:
        consumer(items, done)


def _close(t: _Text) -> bool:
    """At `t.pos` after an element with no ',' next: True (past the ']') when the array ends,
    False when the ',' was beyond the window (now read, `t.pos` after it); else SyntaxProblem."""
    char = t.skip_ws()
    if char == "]":
        t.pos += 1
        return True
    if char == ",":
        t.pos += 1
        t.skip_ws()
        return False
    raise SyntaxProblem("expected ',' or ']'")
