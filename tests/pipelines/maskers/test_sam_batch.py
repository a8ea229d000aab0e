"""--sam-batch-images: the SAM masker embeds several images of a unit in one encoder call.

The reference is the same unit processed one image at a time (batch 1): rows, masks and scores
must agree (masks by pycocotools IoU, scores to float rounding), a bad image in a batch must stay
that image's problem, and the encoder must really have run on batches.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipelines.captioners import Caption
from pipelines.maskers import MASKERS, MaskerConfig, batch_images
from pipelines.process import UnitContext, process_unit
from pipelines.quality import QualityConfig
from pipelines.records import ImageRecord, SourceObject
from tests.helpers.tiny_models import save_sam_checkpoint

SIZES = [(120, 160), (96, 128), (200, 150), (64, 64), (150, 220)]  # (height, width)
MARK = (255, 0, 255)  # pixel (0, 0) of the image the flaky encoder refuses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


def _masker(checkpoint, n: int):
    return MASKERS["sam"](MaskerConfig(name="sam", sam_checkpoint=checkpoint, sam_model="tiny",
                                       device="cpu", sam_batch_images=n))


def _captions(image, boxes, masks, categories):
    return [[Caption(f"a {c}", "test", 1.0)] for c in categories]


def _unit(root, marked: int | None = None) -> list[ImageRecord]:
    """Five readable images of different sizes, with a corrupt file, a missing file and a record
    error between them."""
    rng = np.random.default_rng(0)
    records = []
    for k, (h, w) in enumerate(SIZES):
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        img[h // 4 : h // 2, w // 5 : w // 2] = (200, 40 + 30 * k, 40)
        if k == marked:
            img[0, 0] = MARK
        cv2.imwrite(str(root / f"{k}.png"), img[:, :, ::-1])
        boxes = [[w // 5, h // 4, w // 3, h // 4], [2, 3, w - 10, h - 8], [w // 2, h // 2, 9, 7]]
        objects = [SourceObject(f"{k}-{j}", "thing", b) for j, b in enumerate(boxes)]
        records.append(ImageRecord(str(k), f"{k}.png", w, h, objects))
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    bad = [ImageRecord("c", "corrupt.png", 64, 64, [SourceObject("c-0", "thing", [1, 1, 9, 9])]),
           ImageRecord("m", "missing.png", 64, 64, [SourceObject("m-0", "thing", [1, 1, 9, 9])]),
           ImageRecord("e", "e.png", 64, 64, [SourceObject("e-0", "thing", [1, 1, 9, 9])],
                       error="duplicate image id", error_status="duplicate")]
    # readable, readable, corrupt | readable, missing, readable | error, readable
    return [records[0], records[1], bad[0], records[2], bad[1], records[3], bad[2], records[4]]


def _run(root, records, masker):
    ctx = UnitContext(source="t", split="val", root=root, run_id="r", quality=QualityConfig())
    return process_unit(ctx, records, masker, _captions)


def _encoder_batches(masker, refuse_marked: bool = False) -> list[int]:
    """Records the batch size of every encoder call; optionally the encoder raises on any batch
    holding the marked image (as a model might on one bad input)."""
    sizes: list[int] = []
    encoder = masker.sam.image_encoder
    mark = torch.tensor(MARK, dtype=torch.float32)
    mean, std = masker.sam.pixel_mean.flatten(), masker.sam.pixel_std.flatten()
    real = encoder.forward

    def forward(x):
        sizes.append(x.shape[0])
        pixel = x[:, :, 0, 0] * std + mean  # pixel (0, 0) before normalisation
        if refuse_marked and ((pixel - mark).abs().max(dim=1).values < 0.5).any():
            raise RuntimeError("the encoder refused this image")
        return real(x)

    encoder.forward = forward
    return sizes


def _same_results(got: tuple, want: tuple) -> None:
    (g_images, g_objects), (w_images, w_objects) = got, want
    assert g_images == w_images
    assert [o["object_id"] for o in g_objects] == [o["object_id"] for o in w_objects]
    for g, w in zip(g_objects, w_objects, strict=True):
        assert (g["status"], g.get("reject_code")) == (w["status"], w.get("reject_code"))
        if w.get("mask") is None:
            assert g.get("mask") is None
            continue
        # batched matmuls may round differently: masks may differ at the threshold only
        as_rle = [{"size": [m["height"], m["width"]], "counts": m["counts"]}
                  for m in (g["mask"], w["mask"])]
        assert mask_utils.iou(as_rle[:1], as_rle[1:], [0])[0, 0] > 0.99
        np.testing.assert_allclose(g["pred_iou"], w["pred_iou"], atol=1e-4)
        np.testing.assert_allclose(g["stability"], w["stability"], atol=1e-3)


def test_batched_encoder_gives_the_per_image_results_and_skips_bad_images(checkpoint,
                                                                          tmp_path):
    records = _unit(tmp_path)
    single = _masker(checkpoint, 1)
    one_sizes = _encoder_batches(single)
    want = _run(tmp_path, records, single)
    batched = _masker(checkpoint, 3)
    sizes = _encoder_batches(batched)
    got = _run(tmp_path, records, batched)
    _same_results(got, want)
    assert one_sizes == [1] * 5
    # groups of 3 records: the corrupt, missing and error records are never embedded
    assert sizes == [2, 2, 1]
    statuses = {i["source_image_id"]: i["status"] for i in got[0]}
    assert statuses == {"0": "ok", "1": "ok", "2": "ok", "3": "ok", "4": "ok", "c": "corrupt",
                        "m": "missing", "e": "duplicate"}
    kept = [o for o in got[1] if o["status"] != "rejected"]
    assert len(kept) == 15 and all(o["mask_origin"] == "sam:tiny" for o in kept)


def test_an_image_the_encoder_refuses_fails_alone_not_its_batch(checkpoint, tmp_path):
    records = _unit(tmp_path, marked=2)  # image "2" shares its batch with images "3"
    single = _masker(checkpoint, 1)
    _encoder_batches(single, refuse_marked=True)
    want = _run(tmp_path, records, single)
    batched = _masker(checkpoint, 3)
    sizes = _encoder_batches(batched, refuse_marked=True)
    got = _run(tmp_path, records, batched)
    _same_results(got, want)
    # the refused batch [2, 3] is retried image by image: 3 succeeds, 2 fails alone
    assert sizes == [2, 2, 1, 1, 1]
    by_image = {}
    for o in got[1]:
        by_image.setdefault(o["image_id"].split(":")[-1], []).append(o)
    assert all(o["reject_code"] == "model_error" for o in by_image["2"])
    assert all(o["status"] != "rejected" for k in "0134" for o in by_image[k])


def test_the_option_reaches_the_masker_and_is_checked(checkpoint):
    assert batch_images(_masker(checkpoint, 4)) == 4
    assert batch_images(MASKERS["box"](MaskerConfig(name="box"))) == 1
    with pytest.raises(ValueError, match="--sam-batch-images must be >= 1"):
        _masker(checkpoint, 0)
