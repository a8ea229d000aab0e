"""Independent numpy references shared by the tests of model/ (matcher, criterion)."""

import numpy as np
import torch


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def giou(a, b):
    """Generalized IoU of two cxcywh boxes, by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def pixel_centres(h, w):
    """(h * w, 2) float64 normalised (x, y) centres of an h x w grid, row-major."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                            indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1).double()
