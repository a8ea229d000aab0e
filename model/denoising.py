"""Mask DINO's denoising (DN) queries: noised ground-truth boxes and labels as extra queries.

During training each target box and label is noised (`dn_groups` copies of every target: box centre
moved by up to box_noise * half its size, width/height scaled by 1 +- box_noise, label swapped for
a random text of the sample with probability label_noise) and fed to the decoder as extra queries
whose job is to reconstruct the clean target: an easy, matching-free task that speeds up
convergence (Mask DINO's main accelerator). Their content is the projected text embedding of the
(noised) label through a Linear layer, their reference box the noised box.

Layout: the decoder appends the DN queries after the Q matching queries, group-major:
DN query g * m + j is the g-th noised copy of target j (m = the batch's most targets; slots
j >= M_i of a sample with fewer targets are padding and get no box/mask loss). The self-attention
mask (`dn_attn_mask`) keeps the matching queries from seeing any DN query (they would be handed the
answer) and each DN group from seeing the others; DN queries may look at the matching queries.
The DN targets need no matching: `dn_indices` pairs query g * m + j with target j one-to-one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class DNQueries:
    """content (B, N_dn, d), boxes (B, N_dn, 4) cxcywh in [0, 1], attn_mask (Q + N_dn,
    Q + N_dn) bool (True = blocked), groups and slots per group (N_dn = groups * per_group)."""

    content: Tensor
    boxes: Tensor
    attn_mask: Tensor
    groups: int
    per_group: int


def dn_attn_mask(num_matching: int, groups: int, per_group: int, device=None) -> Tensor:
    """(Q + G*m, Q + G*m) bool, True = blocked; rows attend, columns are attended to. Queries are
    [Q matching | group 0 | group 1 | ...]. Matching queries cannot see any DN query; a DN query
    sees the matching queries and its own group only."""
    n_dn = groups * per_group
    total = num_matching + n_dn
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:num_matching, num_matching:] = True  # matching -> DN: blocked (no answer leaks)
    group = torch.arange(n_dn, device=device) // per_group
    mask[num_matching:, num_matching:] = group[:, None] != group[None, :]
    return mask


def dn_indices(targets: list[dict], groups: int, per_group: int) -> list[tuple[Tensor, Tensor]]:
    """One-to-one (DN query index, target index) pairs per sample, as the matcher returns them."""
    out = []
    for t in targets:
        m = len(t["labels"])
        tgt = torch.arange(m, dtype=torch.long).repeat(groups)
        src = (torch.arange(groups, dtype=torch.long)[:, None] * per_group
               + torch.arange(m, dtype=torch.long)[None, :]).flatten()
        out.append((src, tgt))
    return out


def noise_boxes(boxes: Tensor, scale: float) -> Tensor:
    """(n, 4) cxcywh in [0, 1] -> noised copy (Mask DINO: centre within +-scale*w/2, size x
    (1 +- scale)), clamped to [0, 1] and a minimum size so inverse_sigmoid stays finite."""
    diff = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)
    noised = boxes + (torch.rand_like(boxes) * 2 - 1) * diff * scale
    return noised.clamp(min=1e-3, max=1.0)


class DenoisingQueries(nn.Module):
    """forward(targets, text_emb (B, K, d), num_matching) -> DNQueries or None (no targets).

    Uses the global torch RNG (so a resumed run draws the same noise)."""

    def __init__(self, d: int, groups: int, label_noise: float = 0.2, box_noise: float = 0.4):
        super().__init__()
        if groups < 1:
            raise ValueError(f"dn_groups must be >= 1 to build DN queries, got {groups}")
        self.groups, self.label_noise, self.box_noise = groups, label_noise, box_noise
        self.label_enc = nn.Linear(d, d)

    def forward(self, targets: list[dict], text_emb: Tensor, num_matching: int) -> DNQueries | None:
        per_group = max(len(t["labels"]) for t in targets)
        if per_group == 0:
            return None
        batch, d, device = len(targets), text_emb.shape[-1], text_emb.device
        n_dn = self.groups * per_group
        labels = torch.zeros(batch, n_dn, dtype=torch.long, device=device)
        boxes = torch.full((batch, n_dn, 4), 0.5, device=device, dtype=text_emb.dtype)
        for b, t in enumerate(targets):
            m = len(t["labels"])
            if m == 0:
                continue
            lab = t["labels"].to(device).repeat(self.groups)
            flip = torch.rand(lab.shape, device=device) < self.label_noise
            random_lab = torch.randint(len(t["texts"]), lab.shape, device=device)
            lab = torch.where(flip, random_lab, lab)
            box = noise_boxes(t["boxes"].to(device, text_emb.dtype).repeat(self.groups, 1),
                              self.box_noise)
            slots = (torch.arange(self.groups, device=device)[:, None] * per_group
                     + torch.arange(m, device=device)[None, :]).flatten()
            labels[b, slots] = lab
            boxes[b, slots] = box
        content = self.label_enc(torch.gather(text_emb, 1, labels[..., None].expand(-1, -1, d)))
        # the decoder refines boxes through inverse_sigmoid: keep them strictly inside (0, 1)
        boxes = boxes.clamp(1e-3, 1 - 1e-3)
        mask = dn_attn_mask(num_matching, self.groups, per_group, device)
        return DNQueries(content, boxes, mask, self.groups, per_group)
