"""Reading one image safely: path containment, regular files only, decoding, content hash, size.

`decode_rgb` is the engine's one image decoder (synthesis, `engine show` and training all use it):
EXIF orientation applied, 16-bit samples scaled to 8 bits, PIL's decompression-bomb guard on.
`load_image` returns every failure as a (status, error) pair instead of raising, so that one bad
file becomes one rejected image (and its objects rejected rows) rather than a crashed run.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression bombs are a real failure mode of scraped datasets; PIL's default guard stays on
# (Image.MAX_IMAGE_PIXELS): above twice that limit Image.open raises DecompressionBombError.

# PIL modes that hold 16-bit samples in a wider integer array (PNG/TIFF grayscale 16 bit).
# convert("RGB") clips them at 255 (99.6% of a full-range image turns white), so they are scaled.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# Files above this are not read into memory: PIL's bomb limit (2 x 89.5M pixels) already refuses
# the images such files could hold (even uncompressed RGB at that size is ~540 MB).
MAX_IMAGE_BYTES = 1 << 30


@dataclass
class LoadedImage:
    pixels: np.ndarray | None  # (H, W, 3) uint8 RGB, None when the image could not be used
    sha256: str | None
    status: str  # "ok" or one of schemas IMAGE_STATUSES
    error: str | None


def resolve_inside(root: Path, relative: str) -> Path | None:
    """root / relative, or None when the result would escape root (`../`, absolute paths,
    symlinks) or is no path at all (empty, or with a NUL byte, which no file system accepts)."""
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        return None
    root_resolved = root.resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        return None
    return candidate


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB in the displayed frame.

    EXIF orientation is applied (COCO-style sizes and boxes refer to the image as displayed); 16-bit
    grayscale is scaled by >> 8 (16-bit RGB PNGs PIL already reads as their high bytes). Raises
    ValueError naming `where` when the bytes are not a readable image or exceed PIL's bomb limit.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            # In place: an image without an orientation tag is not copied before convert().
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode in _WIDE_GRAY_MODES:
                wide = np.asarray(img).astype(np.int64)
                gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"cannot decode {where}: not a known image format") from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL's plugins raise many types on bad data (SyntaxError, struct...)
        raise ValueError(f"cannot decode {where}: {type(exc).__name__}: {exc}") from None


class NotRegularFile(PermissionError):
    """The path names a FIFO, device or socket: refused, never opened for reading."""


class FileTooLarge(OSError):
    """The file is larger than MAX_IMAGE_BYTES: refused, never read into memory."""


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path`, which must be a regular file.

    A FIFO would block the read forever and a device could stream without end, so the file type is
    checked with os.stat before opening, and again on the open descriptor (O_NONBLOCK: a FIFO that
    replaced the file in between does not block the open either). Raises FileNotFoundError
    (missing, or a directory), NotRegularFile (another kind of file), FileTooLarge (over
    MAX_IMAGE_BYTES) or OSError (unreadable), each naming the path.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    _check_kind(path, st)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        _check_kind(path, os.fstat(fd))
        return f.read()


def _check_kind(path: Path, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise FileNotFoundError(f"{path} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path} is not a regular file ({_file_kind(st.st_mode)}); not read")
    if st.st_size > MAX_IMAGE_BYTES:
        raise FileTooLarge(f"{path} has {st.st_size} bytes, more than MAX_IMAGE_BYTES "
                           f"({MAX_IMAGE_BYTES}); not read")


def read_label_map(path: Path, flags: int) -> np.ndarray | None:
    """A label/mask PNG of a ground-truth source through OpenCV (`cv2.IMREAD_*` flags), read as a
    regular file only (cv2.imread would block forever on a FIFO); None when it cannot be read or
    decoded, like cv2.imread."""
    import cv2

    try:
        data = read_regular_file(path)
    except OSError:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), f"file mode {oct(mode)}")


def load_image(root: Path, relative: str, width: int | None, height: int | None) -> LoadedImage:
    """Read `relative` under `root` as RGB pixels in the displayed (EXIF-applied) frame.

    A stated width/height that disagrees with the decoded pixels is a size_mismatch rejection.
    """
    path = resolve_inside(root, relative)
    if path is None:
        why = ("contains a NUL byte" if "\x00" in (relative or "")
               else f"escapes the source root {root}")
        return LoadedImage(None, None, "unsafe_path", f"path {relative!r} {why}")
    try:
        data = read_regular_file(path)
    except NotRegularFile as exc:
        return LoadedImage(None, None, "unsafe_path", str(exc))
    except FileTooLarge as exc:
        return LoadedImage(None, None, "corrupt", str(exc))
    except FileNotFoundError as exc:
        return LoadedImage(None, None, "missing", str(exc))
    except OSError as exc:
        return LoadedImage(None, None, "missing", f"cannot read {path}: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        pixels = decode_rgb(data, str(path))
    except ValueError as exc:
        return LoadedImage(None, digest, "corrupt", str(exc))
    h, w = pixels.shape[:2]
    if (width is not None and width != w) or (height is not None and height != h):
        return LoadedImage(
            None,
            digest,
            "size_mismatch",
            f"annotation says {width}x{height} but {path} is {w}x{h} (width x height)",
        )
    return LoadedImage(pixels, digest, "ok", None)
