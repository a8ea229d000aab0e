"""model/inference.py: outputs on the padded input are mapped back to the original image size.

The model here is an *oracle*: outputs built from each eval sample's own targets (mask logits at
stride 4 from the target masks, one confident query per target, the target boxes). If predictions
were mapped back to the original frame wrongly (scale, padding, flip, label -> category), the
metrics against the original-size ground truth would collapse; with the mapping right they are
near perfect, limited only by the stride-4 mask resolution.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import transforms as T
from model.data import ShardSet, iter_eval_samples
from model.inference import Evaluator, boxes_to_original, dataset_categories, segments_to_original
from tests.helpers.runs import synthesize_demo_scenes

SIZE = 256
EXTRA = 5  # queries that predict nothing


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return synthesize_demo_scenes(tmp_path_factory.mktemp("scenes") / "gt", limit=6)


def oracle(sample: dict) -> dict:
    """Outputs of one sample: query m predicts target m (label, mask, box); EXTRA empty queries.
    Query m is learnable for odd m, conditional otherwise (to check the query-type counts)."""
    target = sample["target"]
    m, k = len(target["labels"]), len(target["texts"])
    q = m + EXTRA
    logits = torch.full((q, k), -8.0)
    logits[torch.arange(m), target["labels"]] = 8.0
    coarse = F.avg_pool2d(target["masks"][None].float(), 4)[0] > 0.5 if m else torch.zeros(0)
    masks = torch.full((q, SIZE // 4, SIZE // 4), -8.0)
    masks[:m][coarse.bool()] = 8.0
    boxes = torch.cat([target["boxes"], torch.tensor([[0.5, 0.5, 0.1, 0.1]]).repeat(EXTRA, 1)])
    types = torch.tensor([i % 2 for i in range(m)] + [0] * EXTRA)
    return {"pred_logits": logits, "pred_masks": masks, "pred_boxes": boxes,
            "query_types": types}


def evaluate(scenes, task: str) -> dict:
    vocab, is_thing = dataset_categories(ShardSet(scenes), keep_only=True)
    evaluator = Evaluator(task, vocab, is_thing, num_points=512)
    for sample in iter_eval_samples(scenes, task, SIZE, masks=("gt",)):
        evaluator.add(sample, oracle(sample))
    return evaluator.result()


def test_instance_oracle_scores_near_perfect_ap(scenes):
    result = evaluate(scenes, "instance")
    assert result["images"] == 6
    m = result["metrics"]
    assert m["box_AP"] > 0.95 and m["box_AP50"] == pytest.approx(1.0)
    assert m["mask_AP50"] == pytest.approx(1.0) and m["mask_AP"] > 0.6
    split = result["query_split"]
    assert split["conditional/thing"] + split["learnable/thing"] == result["targets"]
    assert split["learnable/thing"] == sum(
        len(s["target"]["labels"]) // 2 for s in iter_eval_samples(scenes, "instance", SIZE))


def test_detection_semantic_panoptic_referring_foreground_oracles(scenes):
    assert evaluate(scenes, "detection")["metrics"]["box_AP"] > 0.95
    assert evaluate(scenes, "semantic")["metrics"]["mIoU"] > 0.8
    panoptic = evaluate(scenes, "panoptic")["metrics"]
    assert panoptic["PQ"] > 0.7 and panoptic["RQ"] > 0.9
    referring = evaluate(scenes, "referring")
    assert referring["targets"] > referring["images"]  # several expressions per object
    assert referring["metrics"]["cIoU"] > 0.8
    assert evaluate(scenes, "foreground")["metrics"]["MSE"] < 0.02


def test_boxes_and_segments_go_back_to_the_original_frame():
    geo = T.geometry(240, 320, 128, flipped=True)  # resized to 96 x 128, padded to 128 x 128
    # xyxy on the padded, flipped input: x 10..30 is x 98..118 unflipped, i.e. 245..295 original
    xywh = boxes_to_original(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), geo)
    np.testing.assert_allclose(xywh, [[245.0, 50.0, 50.0, 100.0]])
    # and a box running past the image is clipped to it
    np.testing.assert_allclose(boxes_to_original(torch.tensor([[-5.0, 90, 200, 127]]),
                                                 T.geometry(240, 320, 128)), [[0, 225, 320, 15]])
    segments = torch.zeros(128, 128, dtype=torch.int32)
    segments[:48, :64] = 1  # top-left quarter of the (unflipped) resized image
    back = segments_to_original(segments, T.geometry(240, 320, 128))
    assert back.shape == (240, 320)
    assert (back[:120, :160] == 1).all() and (back[120:] == 0).all() and (back[:, 160:] == 0).all()
