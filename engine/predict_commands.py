"""`engine predict`: a trained MQ-Former on an image file or folder -> files a user can open.

    engine predict --checkpoint runs/mq/last.pt --images photos/ --task instance \
        --classes dog,cat --out preds/

--classes defaults to the vocabulary the checkpoint was trained on (names and isthing, stored by
`engine train`); summary.json says which was used (classes_from: "--classes" or "checkpoint").

What DIR (--out) receives (NAME = the image's file name without its suffix):
- overlay/NAME.png            every task: the image with the prediction drawn on it
- results.json + images.json  instance, detection, referring: COCO results (RLE masks, xywh boxes,
                              scores) and the COCO `images` / `categories` they refer to, so
                              `COCO("images.json").loadRes("results.json")` reads them
- semantic/NAME.png           semantic: label map, pixel = index into --classes (uint8; uint16
                              past 255 classes), the image's size
- panoptic/NAME.png + panoptic.json  panoptic: COCO panoptic format (id = R + 256 G + 256^2 B)
- alpha/NAME.png              foreground: the model's foreground probability x 255; matting: the
                              alpha matte solved from the mask (pipelines.matting.refine), with
                              mask/NAME.png the binary mask it refined and matting.json per image
- summary.json                task, checkpoint, texts, classes + classes_from, images, images/s,
                              unreadable files
Images are decoded with their EXIF orientation applied (what a viewer shows). Writes are atomic.
The model path (preprocessing, inference, mapping back) is `engine eval`'s: see model/predict.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
COCO_TASKS = ("instance", "detection", "referring")
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128)]


# ------------------------------------------------------------------------------------- inputs
def load_checkpoint(path: Path) -> dict:
    """The state `engine train` wrote, verified (model.checkpoint.load_checkpoint_file, the path
    eval and the mqformer masker take); one-line errors naming --checkpoint."""
    from model.checkpoint import load_checkpoint_file

    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    try:
        return load_checkpoint_file(path)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"--checkpoint {exc}") from None


def image_files(path: Path) -> list[Path]:
    """--images: one image file, or a folder's image files (sorted, not recursive)."""
    if not path.exists():
        raise FileNotFoundError(f"--images {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"--images {path} is not an image file "
                             f"(suffixes: {', '.join(IMAGE_SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for f in files:  # outputs are named by stem: a.jpg and a.png would overwrite each other
        if f.stem in stems:
            raise ValueError(f"--images {path}: {stems[f.stem].name} and {f.name} would write the "
                             "same output files; rename one")
        stems[f.stem] = f
    return files


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the EXIF orientation applied; ValueError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from None


def _samples(files: list[Path], texts: list[str], size: int, failed: list[dict],
             on_failure=lambda: None):
    """Readable images as run_model samples (+ id, file, pixels); unreadable ones go to `failed`."""
    from model.predict import predict_sample

    for image_id, path in enumerate(files, start=1):
        try:
            pixels = read_image(path)
        except ValueError as exc:
            failed.append({"file": str(path), "reason": str(exc)})
            on_failure()
            continue
        yield {**predict_sample(pixels, texts, size), "image_id": image_id, "file": path,
               "pixels": pixels}


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# ------------------------------------------------------------------------------------ outputs
def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _write_png(path: Path, pixels: np.ndarray, rgb: bool = True) -> None:
    """(H, W, 3) uint8 RGB, or (H, W) uint8/uint16 when rgb is False."""
    array = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if rgb else pixels
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode {path}")
    _write_bytes(path, data.tobytes())


def _write_json(path: Path, value) -> None:
    _write_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


def _rles(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> N COCO compressed RLEs ({"size", "counts" str}), one pycocotools call."""
    from schemas import masks as mask_codec

    return [{"size": [v["height"], v["width"]], "counts": v["counts"]}
            for v in mask_codec.encode(masks)]


def _colour(k: int) -> np.ndarray:
    return np.array(PALETTE[k % len(PALETTE)], np.float32)


def _draw(pixels: np.ndarray, masks=(), boxes=(), labels=(), alpha: float = 0.45) -> np.ndarray:
    """The image with masks tinted, boxes outlined and labels written, (H, W, 3) uint8."""
    canvas = pixels.astype(np.float32)
    for k, m in enumerate(masks):
        canvas[m] = (1 - alpha) * canvas[m] + alpha * _colour(k)
    out = np.ascontiguousarray(canvas.clip(0, 255).astype(np.uint8))
    for k, box in enumerate(boxes):
        x, y, w, h = (int(round(float(v))) for v in box)
        colour = tuple(int(c) for c in _colour(k))
        cv2.rectangle(out, (x, y), (x + max(w, 1) - 1, y + max(h, 1) - 1), colour, 2)
        if k < len(labels):
            cv2.putText(out, labels[k][:40], (x + 2, max(y - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _label_overlay(pixels: np.ndarray, labels: np.ndarray, first: int = 0) -> np.ndarray:
    """Each label value from `first` on tinted in its palette colour (label maps; panoptic
    segments start at 1, 0 being void)."""
    return _draw(pixels, masks=[labels == v for v in range(first, int(labels.max()) + 1)])


def _alpha_overlay(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The image composited over a grey checkerboard through `alpha` (H, W) in [0, 1]."""
    yy, xx = np.indices(alpha.shape)
    board = np.where(((yy // 16 + xx // 16) % 2)[..., None] == 0, 200.0, 120.0)
    a = alpha[..., None]
    return np.clip(a * pixels + (1 - a) * board, 0, 255).astype(np.uint8)


class Writer:
    """Writes one image's predictions as they come, and the run-level files at the end."""

    def __init__(self, out: Path, task: str, names: list[str], is_thing: list[bool],
                 score_threshold: float, matting_method: str, alpha_dir: Path | None = None):
        self.out, self.task, self.names, self.is_thing = out, task, names, is_thing
        self.threshold, self.matting_method = score_threshold, matting_method
        self.alpha_dir = alpha_dir
        self.alpha_scores: list[dict] = []
        self.images: list[dict] = []
        self.results: list[dict] = []
        self.panoptic: list[dict] = []
        self.mattes: list[dict] = []

    def add(self, sample: dict, pred: dict) -> None:
        pixels, name = sample["pixels"], sample["file"].stem
        h, w = pixels.shape[:2]
        self.images.append({"id": sample["image_id"], "file_name": sample["file"].name,
                            "width": w, "height": h})
        draw = {"instance": self._coco, "detection": self._coco, "referring": self._coco,
                "semantic": self._semantic, "panoptic": self._panoptic,
                "foreground": self._foreground, "matting": self._matting}[self.task]
        overlay = draw(sample, pred, name)
        _write_png(self.out / "overlay" / f"{name}.png", overlay)

    def _coco(self, sample: dict, pred: dict, name: str) -> np.ndarray:
        labels = pred.get("labels", np.arange(len(pred["scores"])))
        masks = pred.get("masks")
        rles = _rles(masks) if masks is not None else None
        for i, score in enumerate(pred["scores"]):
            row = {"image_id": sample["image_id"], "category_id": int(labels[i]) + 1,
                   "bbox": [round(float(v), 2) for v in pred["boxes"][i]], "score": float(score)}
            if rles is not None:
                row["segmentation"] = rles[i]
            self.results.append(row)
        shown = [i for i, s in enumerate(pred["scores"]) if s >= self.threshold]
        return _draw(sample["pixels"], masks=[] if masks is None else [masks[i] for i in shown],
                     boxes=[pred["boxes"][i] for i in shown],
                     labels=[f"{self.names[int(labels[i])]} {pred['scores'][i]:.2f}"
                             for i in shown])

    def _semantic(self, sample: dict, pred: dict, name: str) -> np.ndarray:
        dtype = np.uint8 if len(self.names) <= 256 else np.uint16
        _write_png(self.out / "semantic" / f"{name}.png", pred["labels"].astype(dtype), rgb=False)
        return _label_overlay(sample["pixels"], pred["labels"])

    def _panoptic(self, sample: dict, pred: dict, name: str) -> np.ndarray:
        seg = pred["segments"].astype(np.uint32)
        rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
        _write_png(self.out / "panoptic" / f"{name}.png", rgb)
        info = []
        for s in pred["info"]:
            ys, xs = np.nonzero(seg == s["id"])
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                   int(ys.max() - ys.min() + 1)]
            info.append({"id": s["id"], "category_id": s["label"] + 1, "iscrowd": 0,
                         "area": len(ys), "bbox": box, "score": s["score"]})
        self.panoptic.append({"image_id": sample["image_id"], "file_name": f"{name}.png",
                              "segments_info": info})
        return _label_overlay(sample["pixels"], pred["segments"], first=1)

    def _foreground(self, sample: dict, pred: dict, name: str) -> np.ndarray:
        alpha = np.round(pred["prob"] * 255).astype(np.uint8)
        _write_png(self.out / "alpha" / f"{name}.png", alpha, rgb=False)
        self._score_alpha(sample, pred["prob"], pred["prob"] >= 0.5)
        return _alpha_overlay(sample["pixels"], pred["prob"])

    def _score_alpha(self, sample: dict, alpha: np.ndarray, mask: np.ndarray) -> None:
        """With --alpha: MSE / SAD of the alpha and of the binary mask against the GT alpha."""
        if self.alpha_dir is None:
            return
        from pipelines.matting import mse, sad
        from pipelines.sources.matting import check_alpha_size, read_alpha

        path = alpha_file(self.alpha_dir, sample["file"])
        gt = read_alpha(path)
        check_alpha_size(gt, sample["pixels"], path, sample["file"])
        self.alpha_scores.append({"file": sample["file"].name,
                                  "alpha_mse": mse(alpha, gt), "alpha_sad": sad(alpha, gt),
                                  "mask_mse": mse(mask, gt), "mask_sad": sad(mask, gt)})

    def _matting(self, sample: dict, pred: dict, name: str) -> np.ndarray:
        from pipelines.matting import refine

        mask = pred["masks"][0]
        matte = refine(sample["pixels"], mask, method=self.matting_method)
        _write_png(self.out / "mask" / f"{name}.png", mask.astype(np.uint8) * 255, rgb=False)
        _write_png(self.out / "alpha" / f"{name}.png",
                   np.round(matte.alpha * 255).astype(np.uint8), rgb=False)
        self.mattes.append({"image_id": sample["image_id"], "file": sample["file"].name,
                            "prompt": self.names[0], "score": float(pred["scores"][0]),
                            "method": matte.method, "band": matte.band})
        self._score_alpha(sample, matte.alpha, mask)
        return _alpha_overlay(sample["pixels"], matte.alpha)

    def finish(self) -> list[Path]:
        """The run-level files; returns the paths written."""
        categories = [{"id": k + 1, "name": n, "isthing": int(t)}
                      for k, (n, t) in enumerate(zip(self.names, self.is_thing, strict=True))]
        written = []
        if self.task in COCO_TASKS:
            coco = {"images": self.images, "categories": categories, "annotations": []}
            written += [self.out / "images.json", self.out / "results.json"]
            _write_json(written[-2], coco)
            _write_json(written[-1], self.results)
        if self.task == "panoptic":
            written.append(self.out / "panoptic.json")
            _write_json(written[-1], {"images": self.images, "categories": categories,
                                      "annotations": self.panoptic})
        if self.task == "matting":
            written.append(self.out / "matting.json")
            _write_json(written[-1], self.mattes)
        if self.alpha_scores:
            written.append(self.out / "alpha_eval.json")
            _write_json(written[-1], {"mean": self.alpha_means(), "images": self.alpha_scores})
        return written

    def alpha_means(self) -> dict:
        """Means over images of the --alpha scores (alpha vs mask, MSE and SAD)."""
        keys = ("alpha_mse", "mask_mse", "alpha_sad", "mask_sad")
        return {k: float(np.mean([r[k] for r in self.alpha_scores])) for k in keys}


def alpha_file(alpha_dir: Path, image: Path) -> Path:
    """The GT alpha of an image: <alpha_dir>/<image stem>.png (the matting folder layout)."""
    return alpha_dir / f"{image.stem}.png"


def _check_alpha_dir(alpha_dir: Path | None, task: str, files: list[Path]) -> None:
    if alpha_dir is None:
        return
    if task not in ("matting", "foreground"):
        raise ValueError(f"--alpha applies to --task matting or foreground, not {task}")
    if not alpha_dir.is_dir():
        raise FileNotFoundError(f"--alpha {alpha_dir} is not a folder")
    missing = [f for f in files if not alpha_file(alpha_dir, f).is_file()]
    if missing:
        raise FileNotFoundError(f"--alpha: {missing[0]} has no alpha "
                                f"{alpha_file(alpha_dir, missing[0])} ({len(missing)} missing)")


# ------------------------------------------------------------------------------------ command
def predict_command(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint written by `engine train`.")],
    images: Annotated[Path, typer.Option(help="An image file or a folder of images.")],
    task: Annotated[str, typer.Option(help="instance, semantic, panoptic, referring, "
                                           "foreground, detection or matting.")],
    out: Annotated[Path, typer.Option(help="Output folder (overlays, results, maps).")],
    prompt: Annotated[list[str] | None, typer.Option(
        help="Referring expression (repeat for several); matting: the object to matte.")] = None,
    classes: Annotated[str | None, typer.Option(
        help="Category names, comma-separated (instance, detection, semantic, panoptic); "
             "default: the checkpoint's training vocabulary.")]
    = None,
    stuff: Annotated[str | None, typer.Option(
        help="Panoptic: which of --classes are stuff (merged per class).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side (default: training's).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    top_k: Annotated[int, typer.Option(help="Instance/detection: results kept per image.")] = 100,
    score_threshold: Annotated[float, typer.Option(
        help="Overlays draw results scoring at least this (results.json keeps all).")] = 0.5,
    matting_method: Annotated[str, typer.Option(help="Matting solver: cf, knn or lkm.")] = "cf",
    alpha: Annotated[Path | None, typer.Option(
        help="Matting/foreground: folder of GT alphas NAME.png; scores alpha vs mask.")] = None,
) -> None:
    """Run a trained MQ-Former on images: overlays plus COCO results, label maps or alphas."""
    from model.inference import input_size
    from model.predict import to_original
    from pipelines.devices import resolve_device
    from pipelines.matting import METHODS

    _check_prompts(task, prompt, classes, stuff)
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"--batch-size and --top-k must be >= 1, got {batch_size}, {top_k}")
    if matting_method not in METHODS:
        raise ValueError(f"--matting-method {matting_method!r} is not valid; choose one of: "
                         f"{', '.join(METHODS)}")
    files = image_files(images)
    _check_alpha_dir(alpha, task, files)
    state = load_checkpoint(checkpoint)
    texts, names, is_thing, classes_from = _texts(task, prompt, classes, stuff, state, checkpoint)
    size = input_size(state, image_size)
    resolved = resolve_device(device)
    model = _model(state, checkpoint, resolved)
    writer = Writer(out, task, names, is_thing, score_threshold, matting_method, alpha)
    failed: list[dict] = []
    start = time.perf_counter()
    with _progress(len(files)) as (progress, bar):
        from model.inference import run_model

        samples = _samples(files, texts, size, failed, lambda: progress.advance(bar))
        for sample, output in run_model(model, samples, resolved, batch_size):
            pred = to_original(task, output, sample["geometry"], texts=texts,
                               is_thing=is_thing, top_k=top_k)
            writer.add(sample, pred)
            progress.advance(bar)
    seconds = time.perf_counter() - start
    if not writer.images:
        raise ValueError(f"--images {images}: no image could be decoded ({failed[0]['reason']})")
    written = writer.finish()
    summary = {"task": task, "checkpoint": str(checkpoint), "step": state.get("step"),
               "texts": texts, "classes": names if classes_from != "prompt" else None,
               "classes_from": classes_from, "image_size": size, "device": str(resolved),
               "images": len(writer.images), "seconds": seconds,
               "images_per_s": len(writer.images) / seconds if seconds else None,
               "failed": failed,
               **({"alpha_eval": writer.alpha_means()} if writer.alpha_scores else {})}
    _write_json(out / "summary.json", summary)
    for f in failed:
        console.print(f"skipped {f['file']}: {f['reason']}", highlight=False, soft_wrap=True)
    console.print(f"{len(writer.images)} images in {seconds:.1f} s; wrote {out}/overlay/, "
                  + ", ".join(str(p.name) for p in [*written, out / "summary.json"]),
                  highlight=False, soft_wrap=True)
    if writer.alpha_scores:
        means = writer.alpha_means()
        console.print(f"vs --alpha on {len(writer.alpha_scores)} images: alpha MSE "
                      f"{means['alpha_mse']:.5f} SAD {means['alpha_sad']:.3f}, mask MSE "
                      f"{means['mask_mse']:.5f} SAD {means['mask_sad']:.3f}", highlight=False)


def _check_prompts(task: str, prompt: list[str] | None, classes: str | None,
                   stuff: str | None) -> None:
    """The text flags' checks that need no checkpoint (run before it is read)."""
    from model.predict import prompt_texts
    from model.tasks import VOCAB_TASKS

    names = _split(classes)
    if len(set(names)) != len(names):
        raise ValueError(f"--classes lists a name twice: {classes}")
    if names and any(s not in names for s in _split(stuff)):
        unknown = next(s for s in _split(stuff) if s not in names)
        raise ValueError(f"--stuff {unknown!r} is not one of --classes {classes}")
    if _split(stuff) and task != "panoptic":
        raise ValueError("--stuff applies to --task panoptic only")
    if prompt and task not in ("referring", "matting"):
        raise ValueError(f"--prompt applies to --task referring or matting, not {task}")
    if prompt and any(not p.strip() for p in prompt):
        raise ValueError("--prompt is empty")
    if task not in VOCAB_TASKS:  # unknown task, prompt count; class names wait for the checkpoint
        prompt_texts(task, names, prompt)


def _texts(task: str, prompt: list[str] | None, classes: str | None, stuff: str | None,
           state: dict, checkpoint: Path) -> tuple[list[str], list[str], list[bool], str]:
    """--task/--prompt/--classes/--stuff -> (texts the model scores, their names, thing flags,
    where the names came from: "--classes", "checkpoint" (the training vocabulary) or "prompt")."""
    from model.checkpoint import training_vocabulary
    from model.predict import prompt_texts
    from model.tasks import VOCAB_TASKS

    names, stuff_names = _split(classes), _split(stuff)
    classes_from = "--classes" if names else "prompt"
    trained_stuff: list[str] = []
    if task in VOCAB_TASKS and not names:
        vocabulary = training_vocabulary(state)
        if not vocabulary or not vocabulary[0]:
            why = ("stores no training vocabulary (written before checkpoints kept one)"
                   if vocabulary is None else "was trained without class names")
            raise ValueError(f"--task {task} needs --classes a,b,c (the category names): "
                             f"--checkpoint {checkpoint} {why}")
        names, classes_from = vocabulary[0], "checkpoint"
        trained_stuff = [n for n, thing in zip(*vocabulary, strict=True) if not thing]
        unknown = [s for s in stuff_names if s not in names]
        if unknown:
            raise ValueError(f"--stuff {unknown[0]!r} is not one of the checkpoint's classes "
                             f"{','.join(names)}")
    texts = prompt_texts(task, names, prompt)
    if task not in VOCAB_TASKS:  # the names are the prompts (any --classes is not scored)
        names, classes_from = list(texts), "prompt"
    stuff_set = set(stuff_names) if stuff_names else set(trained_stuff)
    return texts, names, [n not in stuff_set for n in names], classes_from


def _model(state: dict, checkpoint: Path, device):
    import torch

    from model.inference import rebuild_model

    try:
        model = rebuild_model(state, checkpoint)
    except ValueError as exc:
        raise ValueError(f"--checkpoint {exc}") from None
    torch.manual_seed(0)
    return model.to(device)


@contextlib.contextmanager
def _progress(total: int) -> Iterator[tuple[Progress, TaskID]]:
    """A rich bar over images (stderr), as `engine train` shows its steps."""
    progress = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("images"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=True)  # the summary line replaces it
    with progress:
        yield progress, progress.add_task("predict", total=total)
