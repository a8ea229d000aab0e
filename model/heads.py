"""Prediction heads shared by every decoder layer (deep supervision).

- class: scaled cosine similarity between a query and each text embedding (open vocabulary),
  logits = exp(s) * cos(W q, T) + b, with a learnable logit scale s (CLIP-style, init 1/0.07) and a
  learnable bias b (init to the focal-loss prior 0.01, so that untrained queries start as "no
  object" for the sigmoid focal loss; the bias is our addition, OpenSeeD has only the scale).
  With class_loss "softmax" (model/build.py) the head also gives a no-object logit per query
  (Mask2Former's extra class), and class probabilities are the softmax over [texts, no-object]
  (`softmax_probs`); `sigmoid_logits` turns them back into logits whose sigmoid is that
  probability, so the post-processors read either model the same way.
- mask: MLP(q) dotted with the stride-4 mask features.
- box: MLP(q) predicts a delta in logit space that refines the query's reference box.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them: in_dim -> hidden (x num_layers-1) -> out_dim."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _with_noobj(logits: Tensor, noobj: Tensor) -> Tensor:
    """(..., K), (...) -> (..., K + 1), in float32 at least (bf16 autocast outputs)."""
    dtype = torch.promote_types(torch.promote_types(logits.dtype, noobj.dtype), torch.float32)
    return torch.cat([logits.to(dtype), noobj.to(dtype)[..., None]], -1)


def softmax_probs(logits: Tensor, noobj: Tensor) -> Tensor:
    """(..., K) text logits (padded slots -inf), (...) no-object logits -> (..., K) probabilities
    of the texts under the softmax over [texts, no-object] (the no-object column dropped)."""
    return _with_noobj(logits, noobj).softmax(-1)[..., :-1]


def sigmoid_logits(logits: Tensor, noobj: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., K) logits whose sigmoid is softmax_probs(logits, noobj): log p - log(1 - p).

    log p comes from log_softmax, exact for tiny p (their ranking survives); 1 - p is clamped at
    eps because it rounds to 0 in float32 for a confident query. Padded slots stay -inf."""
    log_p = _with_noobj(logits, noobj).log_softmax(-1)[..., :-1]
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - eps))


def inference_logits(outputs: dict) -> Tensor:
    """The class logits every post-processor reads as sigmoid probabilities: pred_logits, or with
    a no-object head (pred_noobj) sigmoid_logits of the softmax, so that model/postprocess.py
    needs no second code path."""
    if "pred_noobj" not in outputs:
        return outputs["pred_logits"]
    return sigmoid_logits(outputs["pred_logits"], outputs["pred_noobj"])


class ClassHead(nn.Module):
    """forward(queries (B, Q, d), texts (B, K, d), text_mask (B, K) bool valid) -> (B, Q, K).

    Padded text slots (text_mask False) get -inf: they never win a max and must be sliced away
    before any loss.

    no_object (class_loss "softmax"): a learned d-vector e treated as one more text, so `scores`
    also returns the no-object logit exp(s) * cos(W q, e) (B, Q). A text-like embedding rather
    than a free Linear on the query keeps it on the texts' temperature scale whatever the query's
    norm, and makes "no object" one more direction the projected query can point to. It has no
    bias b: under the softmax a b shared by all K + 1 logits would cancel; this way b is the
    learned offset between every text and no-object, and its focal-prior init makes untrained
    queries start as mostly no-object, as with the sigmoid loss. e is not centred with the
    texts: it is not one of the sample's prompts.

    center_texts: subtract from each text embedding the mean of its sample's texts (samples with
    >= 2 texts) before the cosine. Class prompts share their template ("a photo of a {}."), and
    the projected embeddings drifted together (pairwise cosine 0.95 -> 0.96, issue 11), which
    caps the logit gap between two classes at exp(s) * |t_i - t_j| (~2.8 at s = ln 10); centred,
    only what tells the texts apart is left, so the gap cannot collapse.
    """

    def __init__(self, d: int, init_scale: float = 1 / 0.07, prior_prob: float = 0.01,
                 center_texts: bool = False, no_object: bool = False):
        super().__init__()
        self.center_texts = center_texts
        self.proj = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))
        # about unit norm at init: normalised anyway, and a tiny vector would turn each Adam step
        # into a large rotation
        self.no_object = nn.Parameter(torch.randn(d) / math.sqrt(d)) if no_object else None

    def scale(self) -> Tensor:
        """The temperature exp(s), capped at 100 as CLIP does."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, queries: Tensor, texts: Tensor, text_mask: Tensor) -> Tensor:
        return self.scores(queries, texts, text_mask)[0]

    def scores(self, queries: Tensor, texts: Tensor,
               text_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> text logits (B, Q, K), no-object logits (B, Q) or None without no_object."""
        q = F.normalize(self.proj(queries), dim=-1)
        if self.center_texts:
            valid = text_mask[..., None].to(texts.dtype)
            count = valid.sum(1, keepdim=True)
            mean = (texts * valid).sum(1, keepdim=True) / count.clamp(min=1)
            texts = torch.where(count >= 2, texts - mean, texts)
        t = F.normalize(texts, dim=-1)
        logits = self.scale() * torch.einsum("bqd,bkd->bqk", q, t) + self.bias
        logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
        if self.no_object is None:
            return logits, None
        noobj = self.scale() * (q @ F.normalize(self.no_object, dim=0).to(q.dtype))
        return logits, noobj


class MaskHead(nn.Module):
    """forward(queries (B, Q, d), mask_features (B, mask_dim, h, w)) -> mask logits (B, Q, h, w)."""

    def __init__(self, d: int, mask_dim: int):
        super().__init__()
        self.embed = MLP(d, d, mask_dim, 3)

    def forward(self, queries: Tensor, mask_features: Tensor) -> Tensor:
        return torch.einsum("bqc,bchw->bqhw", self.embed(queries), mask_features)


class BoxHead(nn.Module):
    """forward(queries (B, Q, d)) -> (B, Q, 4) delta added to the reference box's logit.

    The last layer starts at zero so that the first prediction is the reference box itself.
    """

    def __init__(self, d: int):
        super().__init__()
        self.mlp = MLP(d, d, 4, 3)
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(self, queries: Tensor) -> Tensor:
        return self.mlp(queries)


def mask_pool(mask_logits: Tensor, mask_features: Tensor) -> Tensor:
    """(B, Q, h, w) mask logits, (B, C, h, w) features -> (B, Q, C): each query's features averaged
    over its own soft mask (weights sigmoid(logits), detached: the class loss must not reshape
    the masks to suit itself)."""
    weights = mask_logits.detach().sigmoid()
    total = weights.flatten(2).sum(-1, keepdim=True).clamp(min=1e-6)
    return torch.einsum("bqhw,bchw->bqc", weights, mask_features) / total


SHAPE_GRID = 16  # side of the resampled mask crop shape_features gives the class head


def shape_features(mask_logits: Tensor, size: int = SHAPE_GRID) -> Tensor:
    """(B, Q, h, w) mask logits -> (B, Q, size * size + 2): each query's mask probability cropped
    to the extent of its own binary mask (logit > 0; the whole map when it is empty), resampled to
    size x size, and the log width and height of that extent as fractions of the map. Detached:
    the class loss reads the masks' shapes and must not reshape them to suit itself.

    The crop makes the outline scale- and position-free (a star is a star at any size); the two
    log sizes keep the aspect ratio the resampling removes."""
    logits = mask_logits.detach().float()
    batch, queries, h, w = logits.shape
    binary = logits > 0

    def extent(occupied: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """First and one-past-last occupied index along the last dim, (0, n) when none is."""
        first = occupied.float().argmax(-1)
        end = n - occupied.flip(-1).float().argmax(-1)
        empty = ~occupied.any(-1)
        return first.masked_fill(empty, 0), end.masked_fill(empty, n)

    x0, x1 = extent(binary.any(-2), w)  # (B, Q) in pixels of the map
    y0, y1 = extent(binary.any(-1), h)
    steps = (torch.arange(size, device=logits.device, dtype=logits.dtype) + 0.5) / size

    def axis(first: Tensor, end: Tensor, n: int) -> Tensor:
        """size sample positions across [first, end) in grid_sample's [-1, 1] frame."""
        lo, hi = 2 * first.to(logits.dtype) / n - 1, 2 * end.to(logits.dtype) / n - 1
        return lo[..., None] + (hi - lo)[..., None] * steps  # (B, Q, size)

    xs, ys = axis(x0, x1, w), axis(y0, y1, h)
    grid = torch.stack([xs[..., None, :].expand(-1, -1, size, -1),
                        ys[..., :, None].expand(-1, -1, -1, size)], -1)  # (B, Q, size, size, 2)
    crops = F.grid_sample(logits.sigmoid().reshape(batch * queries, 1, h, w),
                          grid.reshape(batch * queries, size, size, 2), mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    sizes = torch.stack([(x1 - x0).to(logits.dtype) / w, (y1 - y0).to(logits.dtype) / h], -1)
    return torch.cat([crops.reshape(batch, queries, size * size), sizes.log()], -1)


class PredictionHeads(nn.Module):
    """LayerNorm + class + mask heads, applied to the queries after every decoder stage.

    pool_masks: the class head also sees the mask features averaged over the query's predicted
    mask (a zero-initialised Linear added to the query, so training starts from the plain head).
    A deformable-attention query samples a few points per head; averaged over its mask it sees
    the whole object (Mask2Former gets this from masked attention). Tried because the tiny
    model took 27 of 67 held-out stars for ellipses; measured, it did not help (held-out mask AP
    0.173 vs 0.214 on the `long` recipe, one seed: bench/README.md), so it is off by default.

    shape_masks: the class head also sees the shape of the query's own predicted mask
    (`shape_features`: the mask cropped to its extent and resampled to 16 x 16, through a
    2-layer MLP whose last layer starts at zero, added to the query). Averaged features say what
    an object is made of, not what its outline is; on the CPU miniature, whose classes differ
    only by outline, the mask head drew the shapes well while the class head confused ellipses,
    polygons and stars (held-out AP 0.33, 0.61 with each query given its best-matching object's
    class). With it, held-out AP was 0.41-0.46 on four seeds in 10 CPU minutes (bench/README.md).
    Off by default: measured on the miniature only.
    """

    def __init__(self, d: int, mask_dim: int, center_texts: bool = False,
                 pool_masks: bool = False, no_object: bool = False, shape_masks: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.cls = ClassHead(d, center_texts=center_texts, no_object=no_object)
        self.mask = MaskHead(d, mask_dim)
        self.pool = nn.Linear(mask_dim, d) if pool_masks else None
        if self.pool is not None:
            nn.init.zeros_(self.pool.weight)
            nn.init.zeros_(self.pool.bias)
        self.shape = MLP(SHAPE_GRID * SHAPE_GRID + 2, d, d, 2) if shape_masks else None
        if self.shape is not None:
            nn.init.zeros_(self.shape.layers[-1].weight)
            nn.init.zeros_(self.shape.layers[-1].bias)

    def forward(self, queries: Tensor, texts: Tensor, text_mask: Tensor,
                mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """-> class logits (B, Q, K), mask logits (B, Q, H/4, W/4)."""
        out = self.predict(queries, texts, text_mask, mask_features)
        return out["pred_logits"], out["pred_masks"]

    def predict(self, queries: Tensor, texts: Tensor, text_mask: Tensor,
                mask_features: Tensor) -> dict[str, Tensor]:
        """-> {"pred_logits" (B, Q, K), "pred_masks" (B, Q, H/4, W/4)}, plus "pred_noobj" (B, Q)
        with a no-object head."""
        q = self.norm(queries)
        masks = self.mask(q, mask_features)
        if self.pool is not None:
            q = q + self.pool(mask_pool(masks, mask_features))
        if self.shape is not None:
            q = q + self.shape(shape_features(masks).to(q.dtype))
        logits, noobj = self.cls.scores(q, texts, text_mask)
        out = {"pred_logits": logits, "pred_masks": masks}
        if noobj is not None:
            out["pred_noobj"] = noobj
        return out
