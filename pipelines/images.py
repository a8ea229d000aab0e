"""Reading one image safely: path containment, decoding, content hash, size check.

Every failure is returned as a (status, error) pair instead of raised, so that one bad file becomes
one rejected image (and its objects rejected rows) rather than a crashed run.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decompression bombs are a real failure mode of scraped datasets; PIL's default guard stays on.


@dataclass
class LoadedImage:
    pixels: np.ndarray | None  # (H, W, 3) uint8 RGB, None when the image could not be used
    sha256: str | None
    status: str  # "ok" or one of schemas IMAGE_STATUSES
    error: str | None


def resolve_inside(root: Path, relative: str) -> Path | None:
    """root / relative, or None when the result would escape root (`../`, absolute paths,
    symlinks)."""
    if not relative or Path(relative).is_absolute():
        return None
    root_resolved = root.resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        return None
    return candidate


def load_image(root: Path, relative: str, width: int | None, height: int | None) -> LoadedImage:
    """Read `relative` under `root` as RGB without applying EXIF rotation.

    Annotation boxes refer to the stored pixel grid (as COCO's do), so EXIF orientation is ignored
    on purpose; a stated width/height that disagrees with the pixels is a size_mismatch rejection.
    """
    path = resolve_inside(root, relative)
    if path is None:
        return LoadedImage(
            None, None, "unsafe_path", f"path {relative!r} escapes the source root {root}"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadedImage(None, None, "missing", f"image file not found: {path}")
    except OSError as exc:
        return LoadedImage(None, None, "missing", f"cannot read {path}: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        return LoadedImage(
            None, digest, "corrupt", f"cannot decode {path}: not a known image format"
        )
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return LoadedImage(None, digest, "corrupt", f"cannot decode {path}: {exc}")
    h, w = pixels.shape[:2]
    if (width is not None and width != w) or (height is not None and height != h):
        return LoadedImage(
            None,
            digest,
            "size_mismatch",
            f"annotation says {width}x{height} but {path} is {w}x{h} (width x height)",
        )
    return LoadedImage(pixels, digest, "ok", None)
