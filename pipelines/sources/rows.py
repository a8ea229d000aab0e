"""COCO `images` / `annotations` entries -> Arrow tables of the index, with every check.

Two ways, one result: `ann_table` converts a whole batch at C speed when the batch is uniform
(every entry an object with the same keys, integer ids and category ids, 4-number boxes, integer
or boolean extra keys, no segmentation: Objects365, V3Det, OpenImages-as-COCO), and otherwise
falls back to `_ann_row` per entry, which checks and reports everything (a test holds the two
equal). A batch the fast path declines costs what it did before; one it takes costs ~1/5.

Faster still, `AnnDecoder` reads such entries straight from the JSON text (msgspec, into typed
structs: no dicts), for the scanner's bulk path: a run of entries whose types all match the
first entry's becomes the same table `ann_table` makes; anything else declines (None) and the
scanner reads that text entry by entry.
"""

from __future__ import annotations

import json
import math
import reprlib
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.masks import check_segmentation_shape

# Annotation keys with their own column; any other key (isfake, isreflected...) goes to attributes.
ANN_KEYS = ("id", "image_id", "category_id", "bbox", "iscrowd", "segmentation", "area")

IMAGES_SCHEMA = pa.schema(
    [("ord", pa.int64()), ("key", pa.string()), ("file_name", pa.string()),
     ("width", pa.int64()), ("height", pa.int64())]
)
# The box is four float columns (null when it is not 4 numbers): much cheaper to write than a list.
ANNS_SCHEMA = pa.schema(
    [("ord", pa.int64()), ("ann_key", pa.string()), ("image_key", pa.string()),
     ("category_id", pa.int64()), ("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()),
     ("h", pa.float64()), ("iscrowd", pa.bool_()), ("segmentation", pa.string()),
     ("attributes", pa.string()), ("error", pa.string())]
)


def _fail(path: Path, where: str, reason: str) -> ValueError:
    return ValueError(f"{path}: {where}: {reason}")


def _id_key(value: Any, path: Path, where: str) -> str:
    """An image/annotation id as text; ints and strings are both seen in COCO-format files."""
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise _fail(path, where, f"id must be an integer or a string, got {reprlib.repr(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise _fail(path, where, f"id must be an integer or a string, got {value!r}")
        value = int(value)
    return str(value)


def _opt_int(value: Any, path: Path, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(path, where, f"expected a number, got {reprlib.repr(value)}")
    return int(value)


def _brief(value: Any, limit: int) -> str:
    """A value as JSON for a message, cut to `limit`; reprlib for values nested too deeply for
    json (it stops at 6 levels)."""
    try:
        return json.dumps(value)[:limit]
    except (RecursionError, TypeError, ValueError):
        return reprlib.repr(value)[:limit]


def _is_number(v: Any) -> bool:
    return type(v) in _NUMBER  # exact types: bool is not a number here


_NUMBER = (int, float)
_ANN_KEY_SET = frozenset(ANN_KEYS)


def _image_row(item: Any, ord_: int, path: Path) -> tuple:
    where = f"images[{ord_}]"
    if type(item) is not dict:
        raise _fail(path, where, f"expected an object, got {type(item).__name__}")
    if "id" not in item:
        raise _fail(path, where, "missing 'id'")
    file_name = item.get("file_name")
    if type(file_name) is not str:
        raise _fail(path, where, f"'file_name' must be a string, got {reprlib.repr(file_name)}")
    return (ord_, _id_key(item["id"], path, where + ".id"), file_name,
            _opt_int(item.get("width"), path, where + ".width"),
            _opt_int(item.get("height"), path, where + ".height"))


_ATTRIBUTE_TEXT: dict[tuple, str] = {}
_SORTED_KEYS: dict[frozenset, tuple] = {}


def _attributes(item: dict, keys: set) -> str:
    """JSON text of the non-standard keys, sorted; memoised (isfake 0, isreflected 0 repeat)."""
    names = _SORTED_KEYS.get(frozen := frozenset(keys))
    if names is None:
        names = _SORTED_KEYS[frozen] = tuple(sorted(keys))
    values = tuple(map(item.__getitem__, names))
    # Value types are part of the key: 1, 1.0 and true hash alike but print differently.
    key = (names, values, tuple(map(type, values)))
    try:
        return _ATTRIBUTE_TEXT[key]
    except KeyError:
        pass
    except TypeError:  # a list or object value: not hashable, not worth caching
        return json.dumps(dict(zip(names, values, strict=True)))
    if len(_ATTRIBUTE_TEXT) > 4096:
        _ATTRIBUTE_TEXT.clear()
        _SORTED_KEYS.clear()
    text = _ATTRIBUTE_TEXT[key] = json.dumps(dict(zip(names, values, strict=True)))
    return text


def _ann_row(item: Any, ord_: int, path: Path) -> tuple:
    """One `annotations` entry -> a row of ANNS_SCHEMA. Called tens of millions of times: the common
    case (int ids, 4-number bbox) takes the fast branches."""
    if type(item) is not dict:
        raise _fail(path, f"annotations[{ord_}]", f"expected an object, got {type(item).__name__}")
    try:
        ann_id, image_id = item["id"], item["image_id"]
    except KeyError as e:
        raise _fail(path, f"annotations[{ord_}]", f"missing {e.args[0]!r}") from None
    ann_key = (str(ann_id) if type(ann_id) is int
               else _id_key(ann_id, path, f"annotations[{ord_}].id"))
    image_key = (str(image_id) if type(image_id) is int
                 else _id_key(image_id, path, f"annotations[{ord_}].image_id"))
    errors = []
    cid = item.get("category_id")
    if type(cid) is not int:
        if type(cid) is float and cid.is_integer():
            cid = int(cid)
        else:
            errors.append(f"category_id is not an integer: {_brief(cid, 40)}")
            cid = None
    bbox = item.get("bbox")
    if (type(bbox) is list and len(bbox) == 4 and type(bbox[0]) in _NUMBER
            and type(bbox[1]) in _NUMBER and type(bbox[2]) in _NUMBER and type(bbox[3]) in _NUMBER):
        x, y, w, h = bbox
    elif type(bbox) is list and len(bbox) == 4 and all(v is None or _is_number(v) for v in bbox):
        # JSON has no NaN; writers such as pandas emit null for it. Passed on as NaN, for the
        # pipeline to reject like any other NaN box.
        x, y, w, h = (math.nan if v is None else v for v in bbox)
    else:
        errors.append(f"bbox is not 4 numbers: {_brief(bbox, 80)}")
        x = y = w = h = None
    seg = item.get("segmentation")
    if seg and (problem := check_segmentation_shape(seg)):
        # Checked before json.dumps (a 20k-deep list recursed) and DuckDB (a 57 MB polygon ran
        # the index sort out of memory); the object is rejected as gt_mask_invalid.
        errors.append(f"segmentation: {problem}")
        seg = None
    extra_keys = item.keys() - _ANN_KEY_SET
    attributes = None
    if extra_keys:
        try:
            attributes = _attributes(item, extra_keys)
        except RecursionError:
            errors.append(f"attributes nest too deeply to store: {sorted(extra_keys)!r}"[:100])
    return (ord_, ann_key, image_key, cid, x, y, w, h, bool(item.get("iscrowd", 0)),
            json.dumps(seg) if seg else None, attributes, "; ".join(errors) or None)


def check_categories(categories: Any, path: Path) -> list[dict]:
    if not isinstance(categories, list):
        raise _fail(path, "categories", f"expected an array, got {type(categories).__name__}")
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        where = f"categories[{i}]"
        if not isinstance(cat, dict):
            raise _fail(path, where, f"expected an object, got {type(cat).__name__}")
        cid, name = cat.get("id"), cat.get("name")
        if not (_is_number(cid) and float(cid).is_integer()):
            raise _fail(path, where, f"'id' must be an integer, got {reprlib.repr(cid)}")
        if not isinstance(name, str):
            raise _fail(path, where, f"'name' must be a string, got {reprlib.repr(name)}")
        if int(cid) in seen:
            raise _fail(path, where, f"duplicate category id {int(cid)}")
        seen.add(int(cid))
    return [{**c, "id": int(c["id"])} for c in categories]


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)


def image_table(items: list, start: int, path: Path) -> pa.Table:
    """`images[start:start + len(items)]` -> rows of IMAGES_SCHEMA: whole columns when the batch
    is uniform (`_uniform_image_table`), else entry by entry with every check."""
    fast = _uniform_image_table(items, start)
    if fast is not None:
        return fast
    return _table([_image_row(item, start + i, path) for i, item in enumerate(items)],
                  IMAGES_SCHEMA)


def _column(items: list, key: str, types: set) -> pa.Array | None:
    """One key of every entry as an Arrow column, when every value's exact type is in `types`;
    None otherwise (or when an entry lacks the key: `types` without NoneType). Types are checked
    in Python before pyarrow sees the values: its inference recursed into a 20k-deep value and
    crashed the process."""
    values = [item.get(key) for item in items]
    if not set(map(type, values)) <= types:
        return None
    try:
        return pa.array(values)
    except _CONVERSION_ERRORS:  # an id beyond int64
        return None


def _uniform_image_table(items: list, start: int) -> pa.Table | None:
    """The batch's columns in C when every entry is an object with an integer (or every one a
    string) id and a string file_name, and integer or missing sizes; None otherwise (the entry
    path then checks each entry and names the bad one)."""
    if _types(items) != {dict}:
        return None
    ids = _column(items, "id", {int})
    if ids is None:
        ids = _column(items, "id", {str})
    names = _column(items, "file_name", {str})
    width, height = (_column(items, k, {int, type(None)}) for k in ("width", "height"))
    if ids is None or names is None or width is None or height is None:
        return None
    if ids.type == _INT:
        ids = pc.cast(ids, pa.string())
    ords = pa.array(np.arange(start, start + len(items), dtype=np.int64))
    return pa.Table.from_arrays([ords, ids, names, width.cast(_INT), height.cast(_INT)],
                                schema=IMAGES_SCHEMA)


def ann_table(items: list, start: int, path: Path) -> pa.Table:
    """`annotations[start:start + len(items)]` -> rows of ANNS_SCHEMA."""
    fast = _uniform_ann_table(items, start)
    if fast is not None:
        return fast
    return _table([_ann_row(item, start + i, path) for i, item in enumerate(items)], ANNS_SCHEMA)


def _types(values: list) -> set:
    return set(map(type, values))


_REQUIRED = frozenset({"id", "image_id", "category_id", "bbox"})
_CONVERSION_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)
_INT, _BOOL = pa.int64(), pa.bool_()


def _uniform_ann_table(items: list, start: int) -> pa.Table | None:
    """The batch as a table, converted in C (pyarrow infers one struct type for all entries);
    None when any entry needs the per-entry path: a different key set, a null, a non-integer id
    (inferred as double or string), a box that is not 4 numbers, a segmentation..."""
    n = len(items)
    if _types(items) != {dict}:
        return None
    keys = set().union(*items)
    # Every entry has every key: the lengths add up only if none is missing one. Checked before
    # pyarrow sees the entries: its inference recursed into a 20k-deep segmentation and crashed.
    if sum(map(len, items)) != n * len(keys) or not _REQUIRED <= keys or "segmentation" in keys:
        return None
    if not _flat(items, keys):
        return None
    try:
        struct = pa.array(items)
        fields = {name: struct.field(name) for name in keys}
    except _CONVERSION_ERRORS:  # mixed types (1 and "1"), an id beyond int64...
        return None
    if any(fields[k].type != _INT or fields[k].null_count
           for k in ("id", "image_id", "category_id")):
        return None
    box = _boxes(fields["bbox"], items)
    if box is None:
        return None
    return _columns(fields, box, keys, start, n)


_SCALARS = frozenset({int, float, bool, str, type(None)})


def _flat(items: list, keys: set) -> bool:
    """Every value a scalar (bbox: a list of scalars). Checked in Python before pyarrow infers
    the batch's types: its inference recursed into a 20k-deep value and crashed the process."""
    for key in keys:
        values = [item[key] for item in items]
        if key == "bbox":
            if set(map(type, values)) != {list}:
                return False
            values = list(chain.from_iterable(values))
        if not set(map(type, values)) <= _SCALARS:
            return False
    return True


def _boxes(bbox: pa.Array, items: list) -> list[pa.Array] | None:
    """x, y, w, h as float64 when every bbox is a list of 4 numbers (no null, no bool)."""
    if not pa.types.is_list(bbox.type) or bbox.null_count:
        return None
    values = bbox.flatten()
    if values.null_count or not (pa.types.is_floating(values.type) or values.type == _INT):
        return None
    if pc.min_max(pc.list_value_length(bbox)).as_py() != {"min": 4, "max": 4}:
        return None
    # Inference reads true as 1.0 next to floats: a bool can only hide behind a 0 or a 1.
    suspects = pc.indices_nonzero(pc.is_in(values, pa.array([0, 1], values.type))).to_pylist()
    if any(type(items[i // 4]["bbox"][i % 4]) is bool for i in suspects):
        return None
    values = values.cast(pa.float64())
    return [pc.list_element(pa.ListArray.from_arrays(bbox.offsets, values), i) for i in range(4)]


def _columns(fields: dict, box: list, keys: set, start: int, n: int) -> pa.Table | None:
    crowd = fields.get("iscrowd")
    if crowd is None:
        iscrowd = pa.array(np.zeros(n, dtype=bool))
    elif crowd.null_count:
        return None
    elif crowd.type == _BOOL:
        iscrowd = crowd
    elif crowd.type == _INT:
        iscrowd = pc.not_equal(crowd, 0)
    else:
        return None
    attributes = _attribute_texts(fields, sorted(keys - _ANN_KEY_SET), n)
    if attributes is None:
        return None
    nulls = pa.nulls(n, pa.string())
    arrays = [pa.array(np.arange(start, start + n, dtype=np.int64)),
              pc.cast(fields["id"], pa.string()), pc.cast(fields["image_id"], pa.string()),
              fields["category_id"], *box, iscrowd, nulls, attributes, nulls]
    return pa.Table.from_arrays(arrays, schema=ANNS_SCHEMA)


def _attribute_texts(fields: dict, names: list[str], n: int) -> pa.Array | None:
    """The JSON text `_attributes` makes ('{"isfake": 0, "isreflected": 1}'), built from whole
    columns; only for integer and boolean values (their JSON text is their Arrow cast)."""
    if not names:
        return pa.nulls(n, pa.string())
    parts: list = []
    for i, name in enumerate(names):
        values = fields[name]
        if values.null_count:
            return None
        if values.type == _INT:
            text = pc.cast(values, pa.string())
        elif values.type == _BOOL:
            text = pc.if_else(values, "true", "false")
        else:
            return None
        parts += [("{" if i == 0 else ", ") + json.dumps(name) + ": ", text]
    return pc.binary_join_element_wise(*parts, "}", "")


# msgspec type of each key of an entry the bulk path takes, by the first entry's Python type.
_BULK_TYPES = {int: int, bool: bool}
_BOX = tuple[float, float, float, float]  # msgspec: exactly 4 numbers (ints become floats)


class AnnDecoder:
    """Entries with the first entry's keys and types, straight from the JSON text of a run of
    them (`table`). Built only for a first entry the column path takes: integer ids and category
    id, a 4-number box, integer or boolean other keys (`area` any number: it is not kept)."""

    def __init__(self, fields: list[tuple[str, Any]]):
        struct = msgspec.defstruct("Ann", fields, forbid_unknown_fields=True)
        self.decoder = msgspec.json.Decoder(list[struct])
        self.names = [name for name, _ in fields]
        self.types = dict(fields)

    @classmethod
    def for_entry(cls, item: Any) -> AnnDecoder | None:
        if type(item) is not dict or not _REQUIRED <= item.keys() or "segmentation" in item:
            return None
        fields: list[tuple[str, Any]] = []
        for name, value in item.items():
            if name == "bbox":
                if type(value) is not list or len(value) != 4 or not all(map(_is_number, value)):
                    return None
                fields.append((name, _BOX))
            elif name == "area" and _is_number(value):
                fields.append((name, float))
            elif type(value) in _BULK_TYPES and (type(value) is int or name not in _REQUIRED):
                fields.append((name, _BULK_TYPES[type(value)]))
            else:
                return None
        return cls(fields)

    def table(self, text: str, start: int) -> pa.Table | None:
        """`text`: entries as in the file, comma-separated (no brackets) -> rows of ANNS_SCHEMA
        numbered from `start`; None when any entry differs (in keys, a type, a value out of
        range) or the text is not such a run, e.g. it ends inside an entry."""
        try:
            anns = self.decoder.decode("[" + text + "]")
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
        n = len(anns)
        try:
            fields = {name: pa.array(list(map(attrgetter(name), anns)),
                                     type=_INT if kind is int else _BOOL)
                      for name, kind in self.types.items() if kind in (int, bool)}
        except (OverflowError, pa.ArrowException):  # an id beyond int64
            return None
        flat = np.fromiter(chain.from_iterable(map(attrgetter("bbox"), anns)), np.float64, 4 * n)
        box = [pa.array(flat[i::4]) for i in range(4)]
        return _columns(fields, box, set(self.names), start, n)
