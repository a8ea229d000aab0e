"""Deformable attention against independent references: pixel gathering, a numpy bilinear loop."""

import numpy as np
import torch

from model.deform_attn import MSDeformAttn, level_start_index, ms_deform_attn_sample

SHAPES = [(4, 6), (2, 3)]


def _setup(seed, n_query=5, heads=2, head_dim=3, points=3, batch=2):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    n = int(shapes.prod(1).sum())
    value = torch.randn(batch, n, heads, head_dim, generator=g, dtype=torch.float64)
    weights = torch.rand(batch, n_query, heads, len(SHAPES), points, generator=g,
                         dtype=torch.float64)
    return g, shapes, value, weights


def _bilinear(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """Explicit bilinear read of img (h, w, C) at normalised (x, y), zeros outside the map."""
    h, w = img.shape[:2]
    px, py = x * w - 0.5, y * h - 0.5  # continuous pixel coordinates, centres at integers
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    out = np.zeros(img.shape[2])
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += wgt * img[yi, xi]
    return out


def _numpy_reference(value, shapes, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, n_query, _, levels, points, _ = locations.shape
    starts = level_start_index(shapes).tolist()
    out = np.zeros((batch, n_query, heads, head_dim))
    for b in range(batch):
        for q in range(n_query):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes.tolist()):
                    img = value[b, starts[lvl]:starts[lvl] + h * w, m].numpy().reshape(h, w, -1)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * _bilinear(img, x, y)
    return out.reshape(batch, n_query, heads * head_dim)


def test_pixel_centres_gather_the_pixels():
    g, shapes, value, weights = _setup(0)
    batch, n_query, heads, levels, points = weights.shape
    starts = level_start_index(shapes).tolist()
    locations = torch.zeros(batch, n_query, heads, levels, points, 2, dtype=torch.float64)
    expected = torch.zeros(batch, n_query, heads, value.shape[-1], dtype=torch.float64)
    for lvl, (h, w) in enumerate(SHAPES):
        ys = torch.randint(0, h, (batch, n_query, heads, points), generator=g)
        xs = torch.randint(0, w, (batch, n_query, heads, points), generator=g)
        locations[:, :, :, lvl, :, 0] = (xs.double() + 0.5) / w
        locations[:, :, :, lvl, :, 1] = (ys.double() + 0.5) / h
        flat = starts[lvl] + ys * w + xs  # (B, Lq, heads, P) token index
        for b in range(batch):
            for m in range(heads):
                gathered = value[b, flat[b, :, m], m]  # (Lq, P, Dh)
                expected[b, :, m] += (weights[b, :, m, lvl, :, None] * gathered).sum(1)
    out = ms_deform_attn_sample(value, shapes, locations, weights)
    torch.testing.assert_close(out, expected.flatten(2))


def test_random_locations_match_explicit_bilinear_loop():
    g, shapes, value, weights = _setup(1)
    batch, n_query, heads, levels, points = weights.shape
    # include points outside [0, 1] to check zero padding
    locations = torch.rand(batch, n_query, heads, levels, points, 2, generator=g,
                           dtype=torch.float64) * 1.4 - 0.2
    out = ms_deform_attn_sample(value, shapes, locations, weights)
    expected = _numpy_reference(value, shapes, locations, weights)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_module_with_zero_offsets_averages_reference_pixels():
    torch.manual_seed(0)
    d, heads = 8, 2
    attn = MSDeformAttn(d_model=d, n_levels=2, n_heads=heads, n_points=3).double()
    with torch.no_grad():  # no offsets, uniform weights: every point reads the reference itself
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
    shapes = torch.tensor(SHAPES)
    n = int(shapes.prod(1).sum())
    value_in = torch.randn(1, n, d, dtype=torch.float64)
    query = torch.randn(1, 2, d, dtype=torch.float64)
    ref = torch.tensor([[(0.25, 0.25)], [(0.75, 0.75)]], dtype=torch.float64)  # (2, 1, 2)
    ref = ref.view(1, 2, 1, 2).expand(1, 2, 2, 2)
    out = attn(query, ref, value_in, shapes)
    value = attn.value_proj(value_in)[0]  # (N, d)
    expected = []
    for x, y in [(0.25, 0.25), (0.75, 0.75)]:
        per_level = []
        start = 0
        for h, w in SHAPES:
            img = value[start:start + h * w].detach().numpy().reshape(h, w, d)
            per_level.append(_bilinear(img, x, y))
            start += h * w
        expected.append(np.mean(per_level, axis=0))
    expected = attn.output_proj(torch.tensor(np.stack(expected))[None])
    torch.testing.assert_close(out, expected)


def test_box_reference_and_gradients():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor(SHAPES)
    value_in = torch.randn(3, int(shapes.prod(1).sum()), 8, requires_grad=True)
    query = torch.randn(3, 4, 8, requires_grad=True)
    boxes = torch.rand(3, 4, 1, 4).expand(3, 4, 2, 4) * 0.5 + 0.25
    out = attn(query, boxes, value_in, shapes)
    assert out.shape == (3, 4, 8)
    out.square().sum().backward()
    # offsets and weights start independent of the query (zero weights), but learn through
    # the sampling locations and softmax
    assert value_in.grad.abs().sum() > 0
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert attn.attention_weights.weight.grad.abs().sum() > 0
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.1)
    query.grad = None
    attn(query, boxes, value_in, shapes).square().sum().backward()
    assert query.grad.abs().sum() > 0
