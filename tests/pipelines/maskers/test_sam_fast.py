"""Fused attention for SAM's encoder gives the same embeddings as segment-anything's own."""

import torch

from pipelines.maskers.sam import SAM_VARIANTS, build_sam
from pipelines.maskers.sam_fast import use_sdpa


def test_sdpa_encoder_matches_segment_anything():
    torch.manual_seed(0)
    sam = build_sam(SAM_VARIANTS["tiny"]).eval()
    for name, p in sam.image_encoder.named_parameters():
        if "rel_pos" in name:  # zero at init: randomise so the bias path is exercised
            p.data.normal_(0, 0.5)
    x = torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    with torch.inference_mode():
        reference = sam.image_encoder(x)
        assert use_sdpa(sam) == len(sam.image_encoder.blocks)
        fused = sam.image_encoder(x)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
