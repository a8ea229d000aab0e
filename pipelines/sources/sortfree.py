"""The sort-free path of the index: annotations already grouped by image in `images` order.

Objects365 and COCO files list `images` first and then the annotations image by image. Their
annotations are then already in the order DuckDB's sort would give them, and the index is
written without the sort, row for row what the sort writes (a test compares the files):

- `AnnSink`, during the scan: when `images` came first, each converted batch of annotations is
  walked along the image ids seen so far and written straight into `annotations.parquet`: no raw
  annotations file, no second pass. The first batch that breaks the order (an unknown image id,
  an image met again later, an id that is not a canonical integer) turns the sink into a raw
  writer: what it wrote goes back to `raw_anns.parquet` and the rest follows, for the sort.
- `write_in_order`, after the scan: the same walk over the raw files, for files whose `images`
  came after their annotations.

A repeated image id always takes the sort (DuckDB flags it); repeated annotation ids are flagged
by one stable numpy argsort of the integer ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sources.rows import ANNS_SCHEMA, IMAGES_SCHEMA, AnnDecoder, ann_table

ROW_GROUP = 4_096  # rows per row group of the index: a unit reads a few of them
WALK_ROWS = 16_384  # rows per batch when a written file is read back
RAW_COMPRESSION = "none"  # of the two temporary raw files
# The columns of a record row: an image, or an orphan group (annotations of an unknown image id:
# ord null, no file); ann_start/ann_count: its rows in annotations.parquet.
RECORD_SCHEMA = pa.schema(
    [("ord", pa.int64()), ("key", pa.string()), ("file_name", pa.string()),
     ("width", pa.int64()), ("height", pa.int64()), ("duplicate", pa.bool_()),
     ("ann_start", pa.int64()), ("ann_count", pa.int64())]
)
# Dictionary-encode only the text that repeats (an image's id, Objects365's attributes, the few
# error texts): the unique annotation ids and the floats gain nothing from it and it cost ~40% of
# writing the file (measured on the 1M-box bench file: 0.84 s -> 0.35-0.53 s, 48 MB -> 42 MB).
ANNS_ENCODING = {"use_dictionary": ["image_key", "attributes", "error"]}
ANN_COLUMNS = ("image_key", "ann_key", "category_id", "x", "y", "w", "h", "iscrowd",
               "segmentation", "attributes", "error")


class Unordered(Exception):
    """The annotations are not grouped by image in `images` order: the sort is needed."""


def _image_keys(keys: pa.ChunkedArray) -> Iterator[tuple[int, str]]:
    """(ordinal, id text) of each image, a chunk of Python strings at a time (not all at once)."""
    ordinal = 0
    for chunk in keys.chunks:
        for lo in range(0, len(chunk), WALK_ROWS):
            for key in chunk.slice(lo, WALK_ROWS).to_pylist():
                yield ordinal, key
                ordinal += 1


class OrderWalk:
    """Follows the annotations' image ids along `images`: each run of one id must be the next
    image with that id or the current one. Gives each annotation its image ordinal, and counts."""

    def __init__(self, keys: pa.ChunkedArray):
        self.images = _image_keys(keys)
        self.counts = np.zeros(len(keys), dtype=np.int64)
        self.ordinal, self.key = -1, None

    def _seek(self, key: str) -> int:
        if key != self.key:
            for ordinal, image_key in self.images:
                if image_key == key:
                    self.ordinal, self.key = ordinal, image_key
                    break
            else:  # an unknown id, or one whose image came earlier: out of order
                raise Unordered
        return self.ordinal

    def ordinals(self, image_keys: pa.Array) -> np.ndarray:
        n = len(image_keys)
        if image_keys.null_count:
            raise Unordered
        changed = pc.not_equal(image_keys.slice(1), image_keys.slice(0, n - 1))
        starts = np.concatenate([[0], pc.indices_nonzero(changed).to_numpy() + 1]).astype(np.int64)
        lengths = np.diff(np.append(starts, n))
        runs = np.array([self._seek(k) for k in pc.take(image_keys, starts).to_pylist()],
                        dtype=np.int64)
        np.add.at(self.counts, runs, lengths)
        return np.repeat(runs, lengths)

    def all_counts(self, n_images: int) -> np.ndarray:
        """Annotations per image, for `n_images` (images listed after the walk began have 0)."""
        return np.concatenate([self.counts, np.zeros(n_images - len(self.counts), np.int64)])


def read_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A written file a batch at a time; pre-buffering would hold most of it in memory."""
    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=WALK_ROWS,
                                                                   columns=columns)


def int_ids(keys: pa.Array) -> np.ndarray | None:
    """Annotation ids as int64; None unless every id is an integer's canonical text ("007" and
    "7" are different ids with one integer)."""
    try:
        ids = pc.cast(keys, pa.int64())
    except pa.ArrowInvalid:  # a non-integer id: DuckDB compares the texts
        return None
    if not pc.all(pc.equal(pc.cast(ids, pa.string()), keys)).as_py():
        return None
    return ids.to_numpy()


def _raw_int_ids(raw_anns: Path) -> np.ndarray | None:
    """`int_ids` of a raw file, filled into one preallocated array a batch at a time."""
    out = np.empty(pq.ParquetFile(raw_anns).metadata.num_rows, dtype=np.int64)
    done = 0
    for batch in read_batches(raw_anns, ["ann_key"]):
        ids = int_ids(batch.column(0))
        if ids is None:
            return None
        out[done:done + len(ids)] = ids
        done += len(ids)
    return out


def duplicate_flags(ids: np.ndarray) -> np.ndarray:
    """Per annotation row (file order): its id was used by an earlier row."""
    order = np.argsort(ids, kind="stable")  # stable: the first use of an id sorts first
    ids = ids[order]
    flags = np.zeros(len(ids), dtype=bool)
    flags[order[1:][ids[1:] == ids[:-1]]] = True
    return flags


def sorted_anns(batch: pa.RecordBatch | pa.Table, img_ord: np.ndarray,
                duplicate: np.ndarray) -> pa.Table:
    """A raw batch in the columns the sort writes (img_ord first, `duplicate` last)."""
    arrays = [pa.array(img_ord), *(batch.column(c) for c in ANN_COLUMNS), pa.array(duplicate)]
    return pa.Table.from_arrays(arrays, names=["img_ord", *ANN_COLUMNS, "duplicate"])


def _empty_anns() -> pa.Table:
    empty = pa.RecordBatch.from_pylist([], schema=ANNS_SCHEMA)
    return sorted_anns(empty, np.zeros(0, np.int64), np.zeros(0, bool))


def write_table(table: pa.Table, path: Path) -> None:
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table)


def write_images(raw_images: Path, path: Path, counts: np.ndarray) -> None:
    """images.parquet as the sort writes it, from the raw images and each one's count."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    with pq.ParquetWriter(path, RECORD_SCHEMA) as writer:
        done = 0
        for batch in read_batches(raw_images):
            n = batch.num_rows
            arrays = [*(batch.column(f.name) for f in IMAGES_SCHEMA),
                      pa.array(np.zeros(n, dtype=bool)), pa.array(starts[done:done + n]),
                      pa.array(counts[done:done + n])]
            writer.write_table(pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA),
                               row_group_size=ROW_GROUP)
            done += n


def _finish(folder: Path, counts: np.ndarray) -> None:
    """images.parquet and the empty orphans.parquet; the raw images go."""
    raw_images = folder / "raw_images.parquet"
    write_images(raw_images, folder / "images.parquet", counts)
    write_table(RECORD_SCHEMA.empty_table(), folder / "orphans.parquet")
    raw_images.unlink()
    pa.default_memory_pool().release_unused()  # the walk's batches, before records are read


def write_in_order(folder: Path) -> bool:
    """After the scan, from the raw files: when every image id is distinct and the annotations
    come grouped by image in `images` order, write the same three files as the sort in one pass.

    Returns False, having written nothing that stays, when the file is not so ordered.
    """
    raw_images, raw_anns = folder / "raw_images.parquet", folder / "raw_anns.parquet"
    keys = pq.read_table(raw_images, columns=["key"]).column("key")
    if pc.count_distinct(keys).as_py() != len(keys):  # a repeated image id: DuckDB flags it
        return False
    walk = OrderWalk(keys)
    anns = folder / "annotations.parquet"
    ids = _raw_int_ids(raw_anns)
    if ids is None:
        return False
    duplicate = duplicate_flags(ids)
    del ids
    try:
        writer = None
        done = 0
        try:
            for batch in read_batches(raw_anns):
                table = sorted_anns(batch, walk.ordinals(batch.column("image_key")),
                                    duplicate[done:done + batch.num_rows])
                done += batch.num_rows
                writer = writer or pq.ParquetWriter(anns, table.schema, **ANNS_ENCODING)
                writer.write_table(table, row_group_size=ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()
    except Unordered:
        anns.unlink(missing_ok=True)
        return False
    if writer is None:  # no annotations at all
        write_table(_empty_anns(), anns)
    raw_anns.unlink()
    _finish(folder, walk.counts)
    return True


class ImageSink:
    """Consumer of `images` batches: appends them to the raw images file and keeps their id
    texts (one Arrow string column; the annotations are walked along it)."""

    def __init__(self, path: Path, convert, json_path: Path):
        self.writer = pq.ParquetWriter(path, IMAGES_SCHEMA, compression=RAW_COMPRESSION)
        self.convert, self.json_path, self.count = convert, json_path, 0
        self.keys: list[pa.Array] = []

    def add(self, items: list, start: int) -> None:
        # Numbered by this sink, not by `start`: a key given twice continues the numbering.
        table = self.convert(items, self.count, self.json_path)
        self.writer.write_table(table)
        self.keys.extend(table.column("key").chunks)
        self.count += len(items)

    def close(self) -> None:
        self.writer.close()


class AnnSink:
    """Consumer of `annotations` batches: written in the index's final form while they come in
    `images` order (see the module docstring), else to the raw file for the sort."""

    def __init__(self, folder: Path, json_path: Path, images: ImageSink, in_order: bool = True):
        self.folder, self.json_path, self.images = folder, json_path, images
        self.final, self.raw_path = folder / "annotations.parquet", folder / "raw_anns.parquet"
        self.ordered, self.count = in_order, 0
        self.walk: OrderWalk | None = None
        self.writer: pq.ParquetWriter | None = None
        self.raw: pq.ParquetWriter | None = None
        self.ids: list[np.ndarray] = []
        self.decoder: AnnDecoder | None = None  # for `bulk`, from the first entry's keys/types
        self.seen_first = False

    def add(self, items: list, start: int) -> None:
        """A batch of entries decoded by the scanner."""
        if not self.seen_first and items:
            self.decoder, self.seen_first = AnnDecoder.for_entry(items[0]), True
        # Numbered by this sink, not by `start`: a key given twice continues the numbering.
        self._take(ann_table(items, self.count, self.json_path))

    def bulk(self, text: str) -> int | None:
        """The scanner's bulk path: a run of entries as JSON text; how many were taken, or None
        (nothing taken: the scanner reads the text entry by entry instead)."""
        table = self.decoder.table(text, self.count) if self.decoder is not None else None
        if table is None:
            return None
        self._take(table)
        return table.num_rows

    def _take(self, table: pa.Table) -> None:
        self.count += table.num_rows
        if self.ordered:
            try:
                self._write_final(table)
                return
            except Unordered:
                pass
        if self.raw is None:
            self._to_raw()
        self.raw.write_table(table)

    def _write_final(self, table: pa.Table) -> None:
        if self.walk is None:
            if not self.images.keys:  # the annotations come first: walked after the scan
                raise Unordered
            self.walk = OrderWalk(pa.chunked_array(self.images.keys, pa.string()))
        ids = int_ids(table.column("ann_key"))
        if ids is None:
            raise Unordered
        ordinals = self.walk.ordinals(table.column("image_key"))
        self.ids.append(ids)
        # Provisional `duplicate`: repeated ids are rare; `finish` rewrites the column if any.
        out = sorted_anns(table, ordinals, np.zeros(len(ordinals), bool))
        self.writer = self.writer or pq.ParquetWriter(self.final, out.schema, **ANNS_ENCODING)
        self.writer.write_table(out, row_group_size=ROW_GROUP)

    def _to_raw(self) -> None:
        """From here on the raw file; what was written in final form goes back to it first (its
        rows are in file order: `ord` is the row number)."""
        self.ordered, self.walk, self.ids = False, None, []
        self.raw = pq.ParquetWriter(self.raw_path, ANNS_SCHEMA, compression=RAW_COMPRESSION)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not self.final.exists():
            return
        done = 0
        for batch in read_batches(self.final):
            n = batch.num_rows
            columns = {"ord": pa.array(np.arange(done, done + n, dtype=np.int64)),
                       **{c: batch.column(c) for c in ANN_COLUMNS}}
            self.raw.write_table(pa.Table.from_arrays([columns[f.name] for f in ANNS_SCHEMA],
                                                      schema=ANNS_SCHEMA))
            done += n
        self.final.unlink()

    def close(self) -> None:
        for writer in (self.writer, self.raw):
            if writer is not None:
                writer.close()
        self.writer = self.raw = None

    def finish(self) -> bool:
        """After the scan (writers closed): True when the index is complete, the sort-free way.
        False when the raw files are left for `write_in_order` or the sort."""
        if not self.ordered:
            if not self.raw_path.exists():  # no annotations: an empty raw file for the others
                self._to_raw()
                self.close()
            return False
        keys = pa.chunked_array(self.images.keys, pa.string())
        if pc.count_distinct(keys).as_py() != len(keys):  # a repeated image id: DuckDB flags it
            self._to_raw()
            self.close()
            return False
        if self.walk is None:  # no annotations at all
            write_table(_empty_anns(), self.final)
            counts = np.zeros(len(keys), np.int64)
        else:
            self._flag_duplicates()
            counts = self.walk.all_counts(len(keys))
        self.images.keys = []
        _finish(self.folder, counts)
        return True

    def _flag_duplicates(self) -> None:
        """Rewrites the `duplicate` column when an annotation id repeats (written atomically)."""
        duplicate = duplicate_flags(np.concatenate(self.ids))
        self.ids = []
        if not duplicate.any():
            return
        tmp = self.final.with_name(self.final.name + ".tmp")
        done = 0
        with pq.ParquetWriter(tmp, pq.read_schema(self.final), **ANNS_ENCODING) as writer:
            for batch in read_batches(self.final):
                n = batch.num_rows
                table = pa.Table.from_batches([batch]).set_column(
                    batch.num_columns - 1, "duplicate", pa.array(duplicate[done:done + n]))
                writer.write_table(table, row_group_size=ROW_GROUP)
                done += n
        os.replace(tmp, self.final)
