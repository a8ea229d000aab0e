"""`--masker mqformer`: an oracle model with known masks checks the box-to-mask matching, the
window, the scores and the fallback exactly; a tiny MQ-Former trained for 3 steps runs through
`engine synthesize` end to end (rows read back by DuckDB and pycocotools); a missing, corrupt or
absent checkpoint is one line, exit 2, before any work."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from engine.cli import main
from pipelines.maskers import MASKERS, MaskerConfig
from pipelines.maskers.mqformer import MQFormerMasker, build_mqformer_masker
from pipelines.sources.demo import DEMO_DIR, scenes_gt_file
from schemas.runs import open_run

TRAIN_FLAGS = ["--model", "tiny", "--text-encoder", "hashed", "--image-size", "128",
               "--batch-size", "2", "--steps", "3", "--log-interval", "1", "--ckpt-interval",
               "3", "--num-points", "256", "--lr", "1e-3", "--grad-clip", "1", "--device", "cpu",
               "--no-tensorboard"]

# Oracle: a 64 x 64 image at input size 64 (scale 1, no padding); masks at stride 4 (16 x 16).
# Low-res rectangles (rows, cols), inclusive-exclusive; logit +amp inside, -amp outside.
RECTS = [((1, 5), (1, 7), 10.0),     # q0: image box x[4, 28] y[4, 20]
         ((9, 15), (8, 16), 10.0),   # q1: x[32, 64] y[36, 60]
         (None, None, 10.0),         # q2: empty
         ((1, 5), (1, 4), 10.0),     # q3: x[4, 16] y[4, 20], a worse match for A than q0
         ((9, 13), (1, 5), 10.0),    # q4: x[4, 20] y[36, 52]
         ((9, 13), (1, 5), 3.0),     # q5: the same box as q4, lower mask score
         ((5, 9), (8, 16), 10.0),    # q6: solid x[32, 64] y[20, 36], hollowed below
         ((5, 9), (9, 15), 10.0)]    # q7: solid x[36, 60] y[20, 36]
# Box -> cells of the 16 x 16 grid whose centres (4j + 2 px) it holds; IoU of masks with them.
PROMPTS = np.array([[5, 5, 27, 19],      # A -> q0 (IoU 1; q3 0.5)
                    [44, 36, 64, 60],    # B -> q1, mask cut to B's window
                    [36, 4, 60, 20],     # C: no mask overlaps -> box fallback
                    [4, 36, 20, 52],     # E: q4 and q5 tie at IoU 1 -> q4 (higher score)
                    [32, 20, 64, 36]],   # F: q6's frame has F's tight box (tight-box IoU 1) but
                   dtype=np.float64)     # fills 20 of its 32 cells (0.625); q7 fills 24 (0.75)
EXPECTED_QUERY = [0, 1, None, 4, 7]


def _oracle_logits() -> torch.Tensor:
    logits = torch.full((len(RECTS), 16, 16), -10.0)
    for q, (rows, cols, amp) in enumerate(RECTS):
        logits[q] = -amp
        if rows is not None:
            logits[q, rows[0]:rows[1], cols[0]:cols[1]] = amp
    logits[6, 6:8, 9:15] = -10.0  # q6: only the frame of its rectangle
    return logits


class OracleModel(torch.nn.Module):
    """MQ-Former's forward contract with fixed mask logits; counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, images, texts):
        self.calls += 1
        b, q = images.shape[0], len(RECTS)
        assert images.shape[-2:] == (64, 64)
        return {"pred_logits": torch.zeros(b, q, 1), "pred_boxes": torch.full((b, q, 4), 0.5),
                "pred_masks": _oracle_logits()[None].expand(b, -1, -1, -1),
                "query_types": torch.zeros(q, dtype=torch.long)}


def _window(box, margin=0.1):
    """Pixels whose centre lies in the box grown by margin x its size (independent of the code)."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    rows, cols = np.indices((64, 64)) + 0.5
    return (cols >= x0 - dx) & (cols < x1 + dx) & (rows >= y0 - dy) & (rows < y1 + dy)


def test_oracle_matching_window_scores_and_fallback():
    model = OracleModel()
    masker = MQFormerMasker(model, "mqformer:oracle", image_size=64, device="cpu", margin=0.1)
    image = np.zeros((64, 64, 3), np.uint8)
    out = masker(image, PROMPTS)
    assert model.calls == 1  # one forward pass for all of the image's boxes
    masks = out.dense()
    full = F.interpolate(_oracle_logits()[None], size=(64, 64), mode="bilinear",
                         align_corners=False)[0].numpy()
    for n, q in enumerate(EXPECTED_QUERY):
        if q is None:
            x0, y0, x1, y1 = PROMPTS[n].astype(int)
            filled = np.zeros((64, 64), bool)
            filled[y0:y1, x0:x1] = True
            np.testing.assert_array_equal(masks[n], filled)
            assert np.isnan(out.pred_iou[n]) and np.isnan(out.stability[n])
            continue
        rows, cols, _ = RECTS[q]
        nearest = np.zeros((64, 64), bool)
        nearest[rows[0] * 4:rows[1] * 4, cols[0] * 4:cols[1] * 4] = True
        win = _window(PROMPTS[n])
        # bilinear upsampling of the stride-4 logits (torch's, as the model's postprocessing):
        # the rectangle's edges fall on pixel edges, only its four corner pixels go negative
        np.testing.assert_array_equal(masks[n], (full[q] > 0) & win)
        assert (nearest & win & ~masks[n]).sum() <= 4
        logits = full[q][win]
        prob = 1 / (1 + np.exp(-logits[logits > 0].astype(np.float64)))
        assert out.pred_iou[n] == pytest.approx(prob.mean(), rel=1e-5)
        assert out.stability[n] == pytest.approx((logits > 1).sum() / (logits > -1).sum())
    assert out.origins == ["mqformer:oracle", "mqformer:oracle", "mqformer:oracle+box-fallback",
                           "mqformer:oracle", "mqformer:oracle"]
    # B's window cut q1's mask: its left columns stay outside
    assert masks[1].sum() < (6 * 4) * (8 * 4)


def test_oracle_maps_a_non_square_image_back_to_its_frame():
    """A 32 x 64 image is padded to 64 x 64: only the top half is image. q1 lies in the padding,
    so only queries inside the image can match; the masks are (32, 64)."""
    masker = MQFormerMasker(OracleModel(), "mqformer:oracle", image_size=64, device="cpu",
                            margin=0.1)
    out = masker(np.zeros((32, 64, 3), np.uint8), PROMPTS[[0]])
    full = F.interpolate(_oracle_logits()[None], size=(64, 64), mode="bilinear",
                         align_corners=False)[0].numpy()
    np.testing.assert_array_equal(out.dense()[0], (full[0] > 0)[:32] & _window(PROMPTS[0])[:32])
    assert out.origins is None


def test_a_box_smaller_than_a_cell_still_matches():
    """A 3 x 3 px box between cell centres (4j + 2 px) holds none of the stride-4 grid's: it
    takes the cell under its centre, so it matches q0 instead of falling back."""
    masker = MQFormerMasker(OracleModel(), "mqformer:oracle", image_size=64, device="cpu")
    out = masker(np.zeros((64, 64, 3), np.uint8), np.array([[10.5, 10.5, 13.5, 13.5]]))
    assert out.origins is None
    expected = np.zeros((64, 64), bool)
    expected[11:14, 11:14] = True  # q0's pixels inside the box (margin 0)
    np.testing.assert_array_equal(out.dense()[0], expected)


def test_no_boxes_gives_no_masks():
    masker = MQFormerMasker(OracleModel(), "mqformer:oracle", image_size=64, device="cpu")
    out = masker(np.zeros((64, 64, 3), np.uint8), np.zeros((0, 4)))
    assert out.dense().shape == (0, 64, 64)


# ------------------------------------------------------------------ a real, tiny checkpoint
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mqformer_masker")
    scenes = tmp / "scenes"
    assert main(["synthesize", "--source", "coco", "--root", str(DEMO_DIR), "--annotations",
                 str(scenes_gt_file()), "--out", str(scenes), "--executor", "local",
                 "--masker", "box", "--captioner", "none"]) == 0
    mix = tmp / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {scenes}\n    weight: 1.0\n"
                   "    tasks: [instance]\n    masks: [gt]\n")
    out = tmp / "flyrun"
    assert main(["train", "--mixture", str(mix), "--out", str(out), *TRAIN_FLAGS]) == 0
    return {"checkpoint": out / "last.pt", "tmp": tmp}


def _synthesize(out, *flags):
    return main(["synthesize", "--source", "coco", "--root", str(DEMO_DIR), "--annotations",
                 str(scenes_gt_file()), "--out", str(out), "--executor", "local", "--remask",
                 "--captioner", "none", "--masker", "mqformer", "--device", "cpu", *flags])


def test_synthesize_with_mqformer_end_to_end(trained):
    out = trained["tmp"] / "synth"
    assert _synthesize(out, "--mask-checkpoint", str(trained["checkpoint"]),
                       "--unit-size", "5") == 0
    gt = json.loads(scenes_gt_file().read_text())
    con = open_run(out).connect()
    rows = con.execute(
        "SELECT o.source_ann_id, o.mask, o.mask_origin, o.status, o.keep, o.reject_code, o.box, "
        "o.pred_iou, o.stability, i.width, i.height FROM objects o JOIN images i USING (image_id)"
    ).fetchall()
    # every input annotation is one row, and the counts add up
    assert sorted(int(r[0]) for r in rows) == sorted(a["id"] for a in gt["annotations"])
    statuses = [r[3] for r in rows]
    assert len(rows) == statuses.count("kept") + statuses.count("filtered") + \
        statuses.count("rejected")
    origins = {r[2] for r in rows}
    assert origins <= {"mqformer:flyrun", "mqformer:flyrun+box-fallback"}, origins
    for _, mask, origin, status, keep, code, box, pred_iou, stability, width, height in rows:
        rle = {"size": [mask["height"], mask["width"]], "counts": mask["counts"].encode()}
        decoded = mask_utils.decode(rle)
        assert decoded.shape == (height, width)
        assert decoded.any()
        x, y, w, h = mask_utils.toBbox(rle)  # inside the prompt box (default margin 0)
        bx, by, bw, bh = box
        assert bx - 1 <= x and x + w <= bx + bw + 1 and by - 1 <= y and y + h <= by + bh + 1
        if origin.endswith("+box-fallback"):
            assert status == "filtered" and code == "mask_fallback" and not keep
            assert pred_iou is None or np.isnan(pred_iou)
        else:
            assert 0 < pred_iou <= 1 and 0 <= stability <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["objects"] == len(gt["annotations"])


@pytest.mark.parametrize("flags, message", [
    (["--mask-checkpoint", "/nonexistent/last.pt"], "/nonexistent/last.pt: no such checkpoint"),
    ([], "--masker mqformer needs --mask-checkpoint"),
])
def test_checkpoint_errors_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert _synthesize(out, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not (out / "manifest.json").exists()


def test_corrupt_checkpoint_is_one_line(trained, tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(trained["checkpoint"].read_bytes()[:2000])  # truncated, no sidecar
    assert _synthesize(tmp_path / "out", "--mask-checkpoint", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(bad) in err and len(err.splitlines()) == 1


def test_registered_and_provenance_names_the_run(trained):
    assert "mqformer" in MASKERS
    masker = build_mqformer_masker(trained["checkpoint"], device="cpu")
    assert masker.origin == "mqformer:flyrun"
    cfg = MaskerConfig(name="mqformer", mask_checkpoint=trained["checkpoint"], device="cpu")
    assert MASKERS["mqformer"](cfg).origin == "mqformer:flyrun"


def test_matching_in_chunks_equals_one_pass_and_brute_force():
    """Chunks of boxes give the one-pass answer, which is the brute-force best IoU per box (ties
    to the higher score), and hold a fraction of the memory (tracemalloc peak, not time)."""
    import tracemalloc

    from pipelines.maskers.mqformer import box_cells, match_masks

    rng = np.random.default_rng(0)
    q, h, w, n = 12, 32, 40, 300
    binary = rng.random((q, h, w)) < 0.3
    binary[3] = binary[5]  # a tie: the higher score must win
    scores = rng.random(q)
    xy = rng.uniform(0, [w, h], size=(n, 2))
    prompts = np.concatenate([xy, xy + rng.uniform(0.2, 15, size=(n, 2))], axis=1)
    one_pass = match_masks(binary, prompts, scores, chunk=n)
    for chunk in (1, 7, 64):
        chunked = match_masks(binary, prompts, scores, chunk=chunk)
        assert np.array_equal(chunked[0], one_pass[0])
        assert np.array_equal(chunked[1], one_pass[1])
    for k, box in enumerate(prompts):
        r0, r1, c0, c1 = box_cells(box, h, w)
        filled = np.zeros((h, w), bool)
        filled[r0:r1, c0:c1] = True
        ious = [(binary[j] & filled).sum() / max((binary[j] | filled).sum(), 1) for j in range(q)]
        expected = max(range(q), key=lambda j: (ious[j], scores[j]))
        assert one_pass[0][k] == expected
        assert one_pass[1][k] == pytest.approx(ious[expected], abs=1e-6)
    peaks = {}
    for chunk in (n, 16):
        tracemalloc.start()
        match_masks(binary, prompts, scores, chunk=chunk)
        peaks[chunk] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[16] < peaks[n] / 4, peaks
