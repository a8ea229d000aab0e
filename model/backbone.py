"""Image backbone: a timm model cut into C2..C5 feature maps at strides 4/8/16/32.

Any timm family with `features_only` support works (ResNet, Swin, ConvNeXt, ...). Weights are random
unless `checkpoint` names a local file (a timm/torchvision-style state dict of the full classifier);
nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from torch import Tensor, nn

log = logging.getLogger(__name__)

STRIDES = (4, 8, 16, 32)


class Backbone(nn.Module):
    """forward(images (B, 3, H, W)) -> list of 4 maps (B, C_l, H / s_l, W / s_l), s = 4, 8, 16, 32.

    `channels` lists C_l. Swin-style models that emit NHWC maps are permuted to NCHW here.
    """

    def __init__(
        self,
        name: str,
        out_indices: tuple[int, ...],
        checkpoint: str | Path | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        kwargs = dict(features_only=True, out_indices=out_indices, **timm_kwargs)
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
            # timm filters/adapts the classifier checkpoint (e.g. Swin position tables) itself.
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        else:
            kwargs["pretrained"] = False
        self.body = timm.create_model(name, **kwargs)
        reductions = tuple(self.body.feature_info.reduction())
        if reductions != STRIDES:
            raise ValueError(
                f"backbone {name} with out_indices {out_indices} gives strides {reductions}, "
                f"need {STRIDES}; pick other out_indices"
            )
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        log.debug("backbone %s channels %s (checkpoint: %s)", name, self.channels, checkpoint)

    def forward(self, images: Tensor) -> list[Tensor]:
        feats = self.body(images)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return feats


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of `module` and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module



