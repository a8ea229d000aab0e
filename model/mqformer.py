"""MQ-Former: a Mask DINO-style segmenter with mixed (learnable + conditional) queries, text labels.

Batch interface (shared with model/data.py and model/criterion.py):

  images: FloatTensor (B, 3, H, W), ImageNet-normalised, H and W multiples of 32.
  texts:  list of B lists of strings, the label vocabulary of each sample (K_i texts: class names in
          prompt templates, referring expressions or captions).
  targets (for the criterion only): list of B dicts with
    "texts": list[str] (the same list as `texts[i]`), "labels": LongTensor (M,) index into texts,
    "boxes": FloatTensor (M, 4) cxcywh normalised to [0, 1] of the padded image,
    "masks": BoolTensor (M, H, W) at image resolution (all False when has_masks is False),
    "has_masks": bool (False: detection-only sample, no mask cost/loss),
    "is_thing": BoolTensor (M,) (only for the query-type diagnostic),
    "task": str, one of instance, semantic, panoptic, referring, foreground, detection.

forward(images, texts) -> dict:
  "pred_logits": (B, Q, K_max) class logits of each query against each of the sample's own texts;
                 texts are padded to K_max = max_i K_i and padded slots hold -inf.
  "pred_noobj":  (B, Q) no-object logits, only with class_loss "softmax" (model/build.py): then the
                 class probabilities are the softmax over [texts, no-object] (model/heads.py
                 softmax_probs), not sigmoid(pred_logits); inference.run_model hands on logits
                 whose sigmoid is that probability. Every stage below carries it too.
  "text_mask":   (B, K_max) bool, True for real texts.
  "pred_masks":  (B, Q, H/4, W/4) mask logits.
  "pred_boxes":  (B, Q, 4) cxcywh in [0, 1] of the padded image.
  "text_embed":  (B, K_max, d) the projected text embeddings the class head compares against
                 (diagnostics: their pairwise cosine).
  "query_types": (Q,) long, index into queries.QUERY_TYPES ("conditional" first, then "learnable").
  "aux_outputs": list of dicts with pred_logits/pred_masks/pred_boxes of the earlier decoder stages
                 (the initial queries, then layers 1 .. L-1): deep supervision.
  "interm_outputs": the encoder proposals (pred_logits/pred_masks/pred_boxes of the top-K tokens),
                 present when there are conditional queries.
  "dn_outputs", "dn_groups", "dn_per_group": with dn_groups > 0, in training mode and given
                 `targets`: the denoising queries' predictions (model/denoising.py), in the final
                 stage and each aux stage; absent otherwise (eval and inference never see them).

The text encoder is frozen and not a submodule: its embeddings (cached by text) go through the
trainable `text_proj` Linear to the model width. The union of the batch's texts is encoded once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.backbone import Backbone
from model.decoder import MixedQueryDecoder
from model.denoising import DenoisingQueries
from model.heads import PredictionHeads
from model.pixel_encoder import PixelEncoder
from model.queries import QUERY_TYPES, ConditionalQueries, LearnableQueries
from model.text import CachedTextEncoder

QUERY_MODES = ("mixed", "learnable", "conditional")


def query_counts(mode: str, num_learnable: int, num_conditional: int) -> tuple[int, int]:
    """(learnable, conditional) counts for an ablation mode; the total is always the same."""
    total = num_learnable + num_conditional
    counts = {"mixed": (num_learnable, num_conditional), "learnable": (total, 0),
              "conditional": (0, total)}
    if mode not in counts:
        raise ValueError(f"unknown queries mode '{mode}'; choose one of: {', '.join(counts)}")
    return counts[mode]


class MQFormer(nn.Module):
    """Backbone -> pixel encoder -> conditional + learnable queries -> mixed decoder -> heads."""

    def __init__(self, backbone: Backbone, pixel_encoder: PixelEncoder, decoder: MixedQueryDecoder,
                 text_encoder: CachedTextEncoder, d: int, mask_dim: int, queries: str = "mixed",
                 num_learnable: int = 100, num_conditional: int = 300,
                 denoising: DenoisingQueries | None = None, center_texts: bool = False,
                 pool_masks: bool = False, class_loss: str = "sigmoid",
                 shape_masks: bool = False):
        super().__init__()
        self.denoising = denoising
        self.class_loss = class_loss
        self.backbone, self.pixel_encoder, self.decoder = backbone, pixel_encoder, decoder
        self.text_encoder = text_encoder  # frozen, plain object: not in state_dict or optimizer
        self.text_proj = nn.Linear(text_encoder.dim, d)
        self.heads = PredictionHeads(d, mask_dim, center_texts, pool_masks,
                                     no_object=class_loss == "softmax", shape_masks=shape_masks)
        self.queries_mode = queries
        self.num_learnable, self.num_conditional = query_counts(queries, num_learnable,
                                                                num_conditional)
        self.conditional = (ConditionalQueries(d, self.num_conditional)
                            if self.num_conditional else None)
        self.learnable = LearnableQueries(self.num_learnable, d) if self.num_learnable else None
        types = [0] * self.num_conditional + [1] * self.num_learnable
        self.register_buffer("query_types", torch.tensor(types, dtype=torch.long), persistent=False)
        assert QUERY_TYPES[0] == "conditional" and QUERY_TYPES[1] == "learnable"

    def embed_texts(self, texts: list[list[str]], device: torch.device) -> tuple[Tensor, Tensor]:
        """Encode the union of texts once -> (B, K_max, d) projected embeddings, (B, K_max) mask."""
        union = list(dict.fromkeys(t for sample in texts for t in sample))
        row = {t: i for i, t in enumerate(union)}
        emb = self.text_proj(self.text_encoder.encode(union).to(device))  # (U, d)
        k_max = max(len(sample) for sample in texts)
        index = torch.zeros(len(texts), k_max, dtype=torch.long, device=device)
        mask = torch.zeros(len(texts), k_max, dtype=torch.bool, device=device)
        for b, sample in enumerate(texts):
            index[b, :len(sample)] = torch.tensor([row[t] for t in sample], device=device)
            mask[b, :len(sample)] = True
        return emb[index], mask

    def _check_inputs(self, images: Tensor, texts: list[list[str]]) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of 32")
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} text lists")
        for i, sample in enumerate(texts):
            if not sample:
                raise ValueError(f"sample {i} has no texts; every sample needs at least one label")

    def forward(self, images: Tensor, texts: list[list[str]],
                targets: list[dict] | None = None) -> dict:
        """targets (the criterion's, training only) feed the denoising queries when enabled."""
        self._check_inputs(images, texts)
        enc = self.pixel_encoder(self.backbone(images))
        text_emb, text_mask = self.embed_texts(texts, images.device)
        contents, boxes, interm = [], [], None
        if self.conditional is not None:
            content, box, interm = self.conditional(enc.memory, enc.spatial_shapes, text_emb,
                                                    text_mask, self.heads, enc.mask_features)
            contents.append(content)
            boxes.append(box)
        if self.learnable is not None:
            content, box = self.learnable(images.shape[0])
            contents.append(content)
            boxes.append(box)
        dn = None
        if self.denoising is not None and self.training and targets is not None:
            dn = self.denoising(targets, text_emb, self.num_conditional + self.num_learnable)
        stages = self.decoder(torch.cat(contents, 1), torch.cat(boxes, 1), self.num_conditional,
                              enc.memory, enc.spatial_shapes, self.heads, text_emb, text_mask,
                              enc.mask_features, dn)
        out = dict(stages[-1])
        if dn is not None:
            out.update(dn_groups=dn.groups, dn_per_group=dn.per_group)
        out.update(text_mask=text_mask, text_embed=text_emb, query_types=self.query_types,
                   aux_outputs=stages[:-1])
        if interm is not None:
            out["interm_outputs"] = interm
        return out
