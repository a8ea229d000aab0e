"""Streaming metrics (model/metrics.py through the Evaluator) == the metrics computed the way the
Evaluator did before, with every full-resolution map kept (tests/helpers/eval_reference.py:
pycocotools for AP, the list-based functions of model/evaluate.py for the rest), on the demo
scenes with a noisy oracle, so that no metric sits at 0 or 1."""

import pytest
import torch
import torch.nn.functional as F

from model.eval_data import iter_eval_samples
from model.inference import Evaluator
from model.shards import ShardSet
from tests.helpers.eval_reference import reference_metrics
from tests.helpers.runs import synthesize_demo_scenes

SIZE = 128
TASKS = ("instance", "detection", "semantic", "panoptic", "referring", "foreground")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return synthesize_demo_scenes(tmp_path_factory.mktemp("metrics") / "gt", limit=6)


def noisy_oracle(sample: dict, seed: int) -> dict:
    """Query m predicts target m with noise (some labels wrong, masks shifted), plus noise
    queries: metrics strictly between the extremes, and ties unlikely."""
    g = torch.Generator().manual_seed(seed)
    target = sample["target"]
    m, k = len(target["labels"]), len(target["texts"])
    q = m + 6
    logits = torch.randn(q, k, generator=g) - 2
    logits[torch.arange(m), target["labels"]] += 5 * torch.rand(m, generator=g)
    coarse = F.avg_pool2d(target["masks"][None].float(), 4)[0] if m else torch.zeros(0)
    masks = torch.randn(q, SIZE // 4, SIZE // 4, generator=g) * 2 - 3
    if m:
        masks[:m] += 8 * torch.roll(coarse, shifts=seed % 3, dims=-1)
    boxes = torch.cat([target["boxes"] + 0.02 * torch.randn(m, 4, generator=g),
                       torch.rand(6, 4, generator=g) * 0.5 + 0.25]).clamp(0.01, 1)
    return {"pred_logits": logits, "pred_masks": masks, "pred_boxes": boxes,
            "query_types": torch.zeros(q, dtype=torch.long)}


@pytest.mark.parametrize("task", TASKS)
def test_streaming_metrics_equal_the_full_map_reference(scenes, task):
    vocab, is_thing = ShardSet(scenes).categories(keep_only=True)
    pairs = [(s, noisy_oracle(s, n))
             for n, s in enumerate(iter_eval_samples(scenes, task, SIZE, masks=("gt",)))]
    evaluator = Evaluator(task, vocab, is_thing, num_points=256)
    for sample, output in pairs:
        evaluator.add(sample, output)
    got = evaluator.result()["metrics"]
    expected = reference_metrics(task, pairs, vocab, is_thing)
    assert got == expected
    assert any(v is not None and 0.0 < v < 1.0 for v in got.values()), got
