"""MQ-Former size variants in one plain dict, and the builder.

    model = build_mqformer("tiny", text_encoder=build_text_encoder("hashed"))
    model = build_mqformer("swin-l", backbone_checkpoint="swin_large.pth")  # minilm text encoder

`tiny` is for tests and CPU runs (timm's `test_convnext` backbone with layer scale 1.0, 32-wide, 30
queries); the others follow Mask DINO's hyper-parameters (d 256, 6 encoder layers, 9 decoder
layers, 100 + 300 queries).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.backbone import Backbone
from model.decoder import MixedQueryDecoder
from model.denoising import DenoisingQueries
from model.mqformer import MQFormer
from model.pixel_encoder import PixelEncoder
from model.text import CachedTextEncoder, build_text_encoder

# Off by default in every size: Mask DINO's denoising queries (model/denoising.py; dn_groups > 0,
# training only), the class head's text centring, its mask pooling and its view of the masks'
# shapes (model/heads.py), and class_loss "softmax": Mask2Former's closed-set classification
# (softmax cross-entropy over the sample's texts plus a learned no-object class,
# model/criterion.py) instead of sigmoid focal loss.
CLASS_LOSSES = ("sigmoid", "softmax")
_OPTIONS = dict(dn_groups=0, dn_label_noise=0.2, dn_box_noise=0.4, center_texts=False,
                pool_masks=False, class_loss="sigmoid", shape_masks=False)
_FULL = dict(**_OPTIONS, d=256, mask_dim=256, enc_layers=6, enc_ffn=2048, dec_layers=9,
             dec_ffn=2048, n_heads=8, n_points=4, num_learnable=100, num_conditional=300,
             joint_self_attn=True, dropout=0.0)

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # timm's layer-scale init 1e-6 (for deep pretrained ConvNeXts) left the random-init blocks at
    # ~0.005 after 1200 steps: zeroing them changed nothing (issue 11). 1.0: plain residual blocks.
    "tiny": dict(backbone="test_convnext", out_indices=(0, 1, 2, 3),
                 backbone_kwargs=dict(ls_init_value=1.0),
                 d=32, mask_dim=32, enc_layers=1, enc_ffn=64, dec_layers=2, dec_ffn=64,
                 n_heads=4, n_points=2, num_learnable=10, num_conditional=20,
                 joint_self_attn=True, dropout=0.0, **_OPTIONS),
    "r50": dict(_FULL, backbone="resnet50", out_indices=(1, 2, 3, 4), backbone_kwargs={}),
    "swin-t": dict(_FULL, backbone="swin_tiny_patch4_window7_224", out_indices=(0, 1, 2, 3),
                   backbone_kwargs=dict(strict_img_size=False, dynamic_img_size=True)),
    "swin-l": dict(_FULL, backbone="swin_large_patch4_window12_384", out_indices=(0, 1, 2, 3),
                   backbone_kwargs=dict(strict_img_size=False, dynamic_img_size=True)),
    # a few M parameters for CPU experiments (bench/ablation.py): ConvNeXt-atto (3.4M) with layer
    # scale 1.0 for random init, as tiny, and a 64-wide transformer
    "small": dict(backbone="convnext_atto", out_indices=(0, 1, 2, 3),
                  backbone_kwargs=dict(ls_init_value=1.0),
                  d=64, mask_dim=64, enc_layers=2, enc_ffn=256, dec_layers=3, dec_ffn=256,
                  n_heads=4, n_points=4, num_learnable=10, num_conditional=20,
                  joint_self_attn=True, dropout=0.0, **_OPTIONS),
}


def model_config(size: str, **overrides) -> dict[str, Any]:
    """The resolved hyper-parameters of a size variant with overrides applied."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size '{size}'; choose one of: {', '.join(MODEL_SIZES)}")
    config = dict(MODEL_SIZES[size])
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; valid: {sorted(config)}")
    config.update(overrides)
    if config["class_loss"] not in CLASS_LOSSES:
        raise ValueError(f"unknown class_loss {config['class_loss']!r}; choose one of: "
                         f"{', '.join(CLASS_LOSSES)}")
    return config


def build_mqformer(size: str = "tiny", text_encoder: CachedTextEncoder | str = "minilm",
                   queries: str = "mixed", backbone_checkpoint: str | Path | None = None,
                   text_encoder_path: str | Path | None = None, **overrides) -> MQFormer:
    """Build MQ-Former. queries: "mixed" | "learnable" | "conditional" (same total count)."""
    cfg = model_config(size, **overrides)
    if isinstance(text_encoder, str):
        text_encoder = build_text_encoder(text_encoder, text_encoder_path)
    backbone = Backbone(cfg["backbone"], tuple(cfg["out_indices"]), backbone_checkpoint,
                        **cfg["backbone_kwargs"])
    pixel_encoder = PixelEncoder(backbone.channels, cfg["d"], cfg["mask_dim"], cfg["enc_layers"],
                                 cfg["n_heads"], cfg["n_points"], cfg["enc_ffn"], cfg["dropout"])
    decoder = MixedQueryDecoder(cfg["d"], cfg["dec_layers"], pixel_encoder.n_levels,
                                cfg["n_heads"], cfg["n_points"], cfg["dec_ffn"],
                                cfg["joint_self_attn"], cfg["dropout"])
    denoising = (DenoisingQueries(cfg["d"], cfg["dn_groups"], cfg["dn_label_noise"],
                                  cfg["dn_box_noise"]) if cfg.get("dn_groups", 0) > 0 else None)
    return MQFormer(backbone, pixel_encoder, decoder, text_encoder, cfg["d"], cfg["mask_dim"],
                    queries, cfg["num_learnable"], cfg["num_conditional"], denoising,
                    cfg.get("center_texts", False), cfg.get("pool_masks", False),
                    cfg.get("class_loss", "sigmoid"), cfg.get("shape_masks", False))
