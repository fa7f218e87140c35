"""Selections, masks and point prompts made from attention maps.

- ``topk_tokens``: the top tokens by score, optionally within a group and with a random share of them dropped.
  Zhang et al., "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification" (ACMIL, ECCV
  2024, arXiv 2311.07125; code ``dazhangyu123/ACMIL``, STKIM in ``architecture/transformer.py``): the top
  ``n_masked_patch`` instances per branch, of which ``int(k * mask_drop)`` chosen at random get their scores set
  to -1e9 (use ``dropped``). Zhu et al., "Dual Cross-Attention Learning" (DCAL, CVPR 2022, arXiv 2205.02151): the
  top R% patches by the class token's rollout become local queries (use ``selected`` with ``ratio``; ``k =
  ceil(ratio * n)`` here, at least one token).
- ``smooth_map`` / ``mask_from_map``: resize (bilinear by default, in torch), Gaussian smoothing (the kernel of
  ``scipy.ndimage.gaussian_filter``: radius ``int(4 sigma + 0.5)``, mirrored edges ``d c b a | a b c d``), min-max
  normalisation, then a fixed threshold (Blended Latent Diffusion / prompt-to-prompt's ``LocalBlend``), a quantile
  (AGLA, An et al., arXiv 2406.12718, code ``Lackel/AGLA`` ``eval/augmentation.py``: keeps the top
  ``1 - itc/2`` share of the smoothed Grad-CAM, i.e. ``quantile = itc / 2``) or Otsu's threshold (256 bins on the
  normalised map, the first maximum of the between-class variance, as ``skimage.filters.threshold_otsu``); then an
  optional dilation. AGLA itself resizes bicubically (skimage, order 3) and blurs with ``sigma = 0.02 * max(H, W)``
  of the output; pass ``mode="bicubic"`` and that sigma to match.
- ``argmax_masks``: Shentu et al., "AttenCraft: Attention-guided Disentanglement of Multiple Concepts for
  Text-to-Image Customization" (arXiv 2405.17965): ``M_c(p) = [argmax_c A_c(p) = c and A_c(p) > tau]`` over
  concept tokens' maps (each divided by its maximum first, our choice; the paper's normalisation is not
  confirmed).
- ``sample_points``: VL-SAM (Lin et al., NeurIPS 2024, arXiv 2410.05963) samples positive and negative points for
  SAM from the aggregated map; its exact rule is not confirmed (no code found). Here: without a generator, the
  peaks (positives: highest, negatives: lowest) with suppression of everything closer than ``min_dist``; with a
  generator, random points with probability proportional to the normalised map (positives) or one minus it
  (negatives), under the same suppression. Coordinates are SAM's ``(x, y)``; labels 1 / 0, and -1 for padding.
- ``attention_gradcam``: the Grad-CAM on attention of LAVIS's ``compute_gradcam``
  (``lavis/models/blip_models/blip_image_text_matching.py``), which AGLA calls on BLIP's image-text matching
  cross-attention: ``mean_h relu(dL/dA_h) * A_h``, then (AGLA) the mean over the text rows.

How this differs from the official codes: everything runs batched in torch (no per-image NumPy/skimage/scipy
steps), so AGLA's bicubic skimage resize and ACMIL's ``torch.rand`` are matched in kind, not bit for bit; the
quantile keeps an exact pixel count (AGLA's ``cam >= sorted[int(n * ratio)]`` keeps one more pixel, plus ties);
LAVIS's Grad-CAM hard-codes 12 heads and a 24 x 24 grid, ours takes any shape.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_int_range, check_nonneg_int, check_pair, check_real_range
from .tokens import TokenSelection, floating_tensor, token_mask, upcast

__all__ = ["PointPrompts", "TopTokens", "argmax_masks", "attention_gradcam", "mask_from_map", "sample_points",
           "smooth_map", "topk_tokens"]


class TopTokens(NamedTuple):
    """``topk_tokens``'s result: boolean masks shaped like the scores."""

    selected: torch.Tensor
    """The top tokens that were kept (the top ``k`` minus ``dropped``)."""
    dropped: torch.Tensor
    """The top tokens dropped at random (ACMIL masks these)."""


class PointPrompts(NamedTuple):
    """``sample_points``'s result, in SAM's prompt format."""

    coords: torch.Tensor
    """``(..., n_pos + n_neg, 2)`` int64 pixel coordinates ``(x, y)`` = ``(column, row)``; -1 for padding."""
    labels: torch.Tensor
    """``(..., n_pos + n_neg)`` int64: 1 positive, 0 negative, -1 padding (no pixel was left)."""




def _rank(key: torch.Tensor) -> torch.Tensor:
    """Position of every entry in a descending stable sort along the last axis (ties: lower index first)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    pos = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def topk_tokens(scores: torch.Tensor, k: int | None = None, *, ratio: float | None = None,
                among: TokenSelection | None = None, random_drop: float = 0.0,
                generator: torch.Generator | None = None, largest: bool = True) -> TopTokens:
    """The top tokens by score along the last axis, within a group, with a random share dropped.

    Args:
        scores: ``(..., N)`` scores (pre- or post-softmax attention, rollout rows, ...), floating; not NaN.
        k: how many tokens per row, >= 1 (capped at the number of candidates, as ACMIL's ``min(k, n)``).
        ratio: instead of ``k``, a share of the candidates in ``(0, 1]``: ``k = ceil(ratio * n)`` per row.
        among: the candidate tokens (default all): a slice, indices or a boolean ``(N,)`` / ``(..., N)`` mask.
        random_drop: the share of the top ``k`` dropped at random, in ``[0, 1]``: ``int(k * random_drop)`` tokens
            per row (ACMIL's ``mask_drop``), chosen uniformly.
        generator: the random source of the drop (deterministic given its seed); default torch's global one.
        largest: rank by the largest scores (True) or the smallest.

    Returns:
        ``TopTokens(selected, dropped)``: boolean ``(..., N)`` masks; ties are broken by the lower index.

    Raises:
        TypeError: ``scores`` not floating; ``k`` / ``ratio`` / ``random_drop`` / ``largest`` of the wrong type.
        ValueError: neither or both of ``k`` and ``ratio``; ``k < 1``; ``ratio`` outside ``(0, 1]``;
            ``random_drop`` outside ``[0, 1]``; ``among`` out of range or of the wrong length.

    Examples:
        >>> import torch
        >>> from nearfar.steer import topk_tokens
        >>> s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
        >>> topk_tokens(s, 2).selected.tolist()
        [False, True, False, True, False]
        >>> topk_tokens(s, 2, among=[0, 2, 4]).selected.tolist()       # only tokens 0, 2, 4 may be picked
        [False, False, True, False, True]
    """
    s = floating_tensor(scores, "scores", 1)
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k (a count) and ratio (a share of the candidates)")
    if k is not None:
        k = check_int_range(k, "k", 1, 2**62)
    else:
        ratio = check_real_range(ratio, "ratio", 0.0, 1.0, open_low=True)
    random_drop = check_real_range(random_drop, "random_drop", 0.0, 1.0)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {largest!r}")
    n = s.shape[-1]
    cand = torch.ones_like(s, dtype=torch.bool) if among is None else token_mask(among, n, name="among",
                                                                                 device=s.device)
    try:
        cand = cand.expand(s.shape)
    except RuntimeError:
        raise ValueError(f"among as a mask {tuple(cand.shape)} must broadcast to scores {tuple(s.shape)}") from None
    key = (s if largest else -s).masked_fill(~cand, -math.inf)
    count = cand.sum(-1, keepdim=True)
    if k is not None:
        k_row = count.clamp(max=k)
    else:
        assert ratio is not None
        k_row = torch.ceil(count.double() * ratio - 1e-9).long().clamp(min=1)
    top = (_rank(key) < k_row) & cand
    dropped = torch.zeros_like(top)
    if random_drop > 0:
        u = torch.rand(s.shape, generator=generator, device=s.device if generator is None else generator.device)
        u = u.to(s.device).masked_fill(~top, 2.0)
        n_drop = torch.floor(k_row.double() * random_drop + 1e-9).long()
        dropped = (_rank(-u) < n_drop) & top
    return TopTokens(top & ~dropped, dropped)


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(M, H, W)`` with mirrored edges (scipy's "reflect")."""
    r = int(4.0 * sigma + 0.5)
    if r == 0:
        return x
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    for axis in (1, 2):
        n = x.shape[axis]
        i = torch.arange(-r, n + r, device=x.device) % (2 * n)
        i = torch.where(i >= n, 2 * n - 1 - i, i)
        x = (x.index_select(axis, i).unfold(axis, 2 * r + 1, 1) * kernel).sum(-1)
    return x


def smooth_map(maps: torch.Tensor, sigma: float = 0.0, *, out_size: int | tuple[int, int] | None = None,
               mode: str = "bilinear") -> torch.Tensor:
    """Resize maps ``(..., H, W)`` to ``out_size`` (``F.interpolate``, ``align_corners=False``), then blur them
    with a Gaussian of standard deviation ``sigma`` output pixels. Differentiable (A-STAR smooths its maps).

    Args:
        maps: ``(..., H, W)``, floating (float16/bfloat16 are processed in float32).
        sigma: the Gaussian's standard deviation in pixels, >= 0 (0: no blur).
        out_size: the output ``(H', W')`` (an int for a square), or None to keep the size.
        mode: "bilinear", "bicubic" or "nearest".

    Returns:
        ``(..., H', W')`` in the maps' dtype.

    Raises:
        TypeError: not a floating tensor.
        ValueError: fewer than 2 dimensions or empty; ``sigma < 0``; a non-positive ``out_size``; unknown ``mode``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import smooth_map
        >>> smooth_map(torch.rand(2, 16, 16), 1.5, out_size=64).shape
        torch.Size([2, 64, 64])
    """
    x = floating_tensor(maps, "maps", 2)
    sigma = check_real_range(sigma, "sigma", 0.0, math.inf)
    size = None if out_size is None else check_pair(out_size, "out_size")
    mode = check_choice(mode, "mode", ("bilinear", "bicubic", "nearest"))
    flat = _smooth(upcast(x).reshape(-1, *x.shape[-2:]), sigma, size, mode)
    return flat.reshape(*x.shape[:-2], *flat.shape[-2:]).to(x.dtype)


def _smooth(flat: torch.Tensor, sigma: float, size: tuple[int, int] | None, mode: str) -> torch.Tensor:
    """``smooth_map`` on checked ``(M, H, W)`` maps, in their (working) dtype."""
    if size is not None and size != tuple(flat.shape[-2:]):
        flat = F.interpolate(flat.unsqueeze(1), size=size, mode=mode,
                             align_corners=None if mode == "nearest" else False).squeeze(1)
    if sigma > 0:
        flat = _gaussian(flat, sigma)
    return flat


def _minmax(flat: torch.Tensor) -> torch.Tensor:
    lo = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - lo
    return torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)


def _otsu(unit: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's mask of ``(M, P)`` values in ``[0, 1]``: the bins above the first maximiser of the between-class
    variance ``(mu_T w - mu)^2 / (w (1 - w))``."""
    idx = (unit * bins).long().clamp(0, bins - 1)
    hist = torch.zeros(unit.shape[0], bins, dtype=torch.float64, device=unit.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = hist / unit.shape[1]
    centers = (torch.arange(bins, dtype=torch.float64, device=unit.device) + 0.5) / bins
    omega = p.cumsum(-1)
    mu = (p * centers).cumsum(-1)
    between = (mu[:, -1:] * omega - mu) ** 2 / (omega * (1 - omega))
    between = torch.where((omega > 0) & (omega < 1), between, -1.0)
    return idx > between.argmax(-1, keepdim=True)


def mask_from_map(maps: torch.Tensor, *, threshold: float | None = None, quantile: float | None = None,
                  method: str | None = None, smooth_sigma: float = 0.0,
                  out_size: int | tuple[int, int] | None = None, dilate: int = 0, normalize: bool = True,
                  mode: str = "bilinear") -> torch.Tensor:
    """A binary mask from each map ``(..., H, W)``: resize, smooth, normalise, threshold, dilate.

    Exactly one of ``threshold``, ``quantile`` and ``method`` may be given; with none, Otsu's method is used.

    Args:
        maps: ``(..., H, W)`` maps, floating.
        threshold: keep pixels above it (strictly), on the min-max normalised map when ``normalize``.
        quantile: in ``[0, 1]``: keep the ``round((1 - quantile) * H' W')`` highest pixels (ties: lower flat index
            first), i.e. exactly the share ``1 - quantile`` up to one pixel.
        method: "otsu": keep pixels above Otsu's threshold of the normalised map.
        smooth_sigma: as ``smooth_map``'s ``sigma`` (in output pixels).
        out_size: as ``smooth_map``.
        mode: as ``smooth_map``.
        dilate: grow the mask by this many pixels (a ``(2 dilate + 1)^2`` square), >= 0.
        normalize: min-max normalise every map to ``[0, 1]`` before a fixed threshold (a constant map becomes 0).

    Returns:
        A boolean ``(..., H', W')`` mask.

    Raises:
        TypeError: not a floating tensor; arguments of the wrong type.
        ValueError: more than one of ``threshold`` / ``quantile`` / ``method``; ``quantile`` outside ``[0, 1]``;
            unknown ``method``; as ``smooth_map``; ``dilate < 0``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import mask_from_map
        >>> m = torch.zeros(8, 8); m[2:5, 2:5] = 1.0; m += 0.01 * torch.rand(8, 8)
        >>> int(mask_from_map(m).sum()), int(mask_from_map(m, quantile=0.75).sum())
        (9, 16)
    """
    x = floating_tensor(maps, "maps", 2)
    if sum(v is not None for v in (threshold, quantile, method)) > 1:
        raise ValueError("give at most one of threshold, quantile and method")
    if threshold is not None:
        threshold = check_real_range(threshold, "threshold", -math.inf, math.inf)
    if quantile is not None:
        quantile = check_real_range(quantile, "quantile", 0.0, 1.0)
    if threshold is None and quantile is None:
        method = check_choice("otsu" if method is None else method, "method", ("otsu",))
    dilate = check_nonneg_int(dilate, "dilate")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    sigma = check_real_range(smooth_sigma, "smooth_sigma", 0.0, math.inf)
    size = None if out_size is None else check_pair(out_size, "out_size")
    mode = check_choice(mode, "mode", ("bilinear", "bicubic", "nearest"))
    smoothed = _smooth(upcast(x).detach().reshape(-1, *x.shape[-2:]), sigma, size, mode)
    h, w = smoothed.shape[-2:]
    flat = smoothed.reshape(-1, h * w)
    if quantile is not None:
        keep = int(math.floor((1.0 - quantile) * h * w + 0.5))
        mask = _rank(flat) < keep
    elif threshold is not None:
        mask = (_minmax(flat) if normalize else flat) > threshold
    else:
        mask = _otsu(_minmax(flat))
    mask = mask.view(-1, 1, h, w)
    if dilate:
        mask = F.max_pool2d(mask.float(), 2 * dilate + 1, stride=1, padding=dilate) > 0
    return mask.reshape(*x.shape[:-2], h, w)


def argmax_masks(maps_per_token: torch.Tensor, tau: float, *, dim: int = -3, normalize: bool = True
                 ) -> torch.Tensor:
    """AttenCraft's exclusive concept masks: pixel ``p`` belongs to concept ``c`` when ``c`` has the largest map
    value there and that value exceeds ``tau``.

    Args:
        maps_per_token: maps with a concept axis ``dim`` followed by the spatial axes, e.g. ``(B, C, H, W)``.
        tau: the threshold; in ``[0, 1]`` when ``normalize``.
        dim: the concept axis (default -3, for ``(..., C, H, W)``).
        normalize: divide each concept's map by its maximum over the axes after ``dim`` first.

    Returns:
        A boolean mask shaped like the maps; at most one concept per pixel (ties: the lower concept index).

    Raises:
        TypeError: not a floating tensor.
        ValueError: ``dim`` out of range or without spatial axes after it; ``tau`` out of range.

    Examples:
        >>> import torch
        >>> from nearfar.steer import argmax_masks
        >>> a = torch.tensor([[[0.9, 0.1], [0.0, 0.2]], [[0.1, 0.8], [0.0, 0.1]]])   # 2 concepts, 2 x 2
        >>> argmax_masks(a, 0.2).int().tolist()       # pixel (1, 1): 0.2 / 0.9 > 0.2 beats 0.1 / 0.8
        [[[1, 0], [0, 1]], [[0, 1], [0, 0]]]
    """
    x = floating_tensor(maps_per_token, "maps_per_token", 2)
    d = check_int_range(dim, "dim", -x.dim(), x.dim() - 2) % x.dim()
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    tau = check_real_range(tau, "tau", 0.0, 1.0) if normalize else check_real_range(tau, "tau", -math.inf, math.inf)
    w = upcast(x).detach()
    if normalize:
        peak = w.amax(tuple(range(d + 1, w.dim())), keepdim=True)
        w = torch.where(peak > 0, w / torch.where(peak > 0, peak, torch.ones_like(peak)), w)
    win = w.argmax(d, keepdim=True)
    concept = torch.arange(w.shape[d], device=w.device).view(-1, *([1] * (w.dim() - d - 1)))
    return (win == concept) & (w > tau)


def sample_points(maps: torch.Tensor, n_pos: int, n_neg: int = 0, min_dist: float = 0.0, *,
                  generator: torch.Generator | None = None) -> PointPrompts:
    """Positive and negative point prompts from maps ``(..., H, W)`` (VL-SAM's prompt generation, as we read it).

    Points are picked one at a time, positives first; every picked point removes the pixels closer than
    ``min_dist`` (Euclidean, in pixels) and itself from later picks. Without ``generator``: the highest remaining
    pixel (positives) or the lowest (negatives). With ``generator``: a random remaining pixel with probability
    proportional to the min-max normalised map (positives) or one minus it (negatives).

    Args:
        maps: ``(..., H, W)`` maps, floating.
        n_pos: positive points, >= 0.
        n_neg: negative points, >= 0 (``n_pos + n_neg >= 1``).
        min_dist: the suppression radius in pixels, >= 0.
        generator: the random source (deterministic given its seed), or None for peak picking.

    Returns:
        ``PointPrompts(coords, labels)``: ``(..., n_pos + n_neg, 2)`` ``(x, y)`` and ``(..., n_pos + n_neg)``
        labels (1, 0; -1 and coordinates -1 where no pixel with a positive probability was left).

    Raises:
        TypeError: not a floating tensor; counts not ints.
        ValueError: negative counts or none at all; ``min_dist < 0``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import sample_points
        >>> m = torch.zeros(5, 5); m[1, 3] = 1.0; m[4, 0] = 0.5
        >>> p = sample_points(m, 2, 1, min_dist=1.5)
        >>> p.coords.tolist(), p.labels.tolist()
        ([[3, 1], [0, 4], [0, 0]], [1, 1, 0])
    """
    x = floating_tensor(maps, "maps", 2)
    n_pos = check_nonneg_int(n_pos, "n_pos")
    n_neg = check_nonneg_int(n_neg, "n_neg")
    if n_pos + n_neg == 0:
        raise ValueError("ask for at least one point (n_pos + n_neg >= 1)")
    min_dist = check_real_range(min_dist, "min_dist", 0.0, math.inf)
    h, w = x.shape[-2:]
    unit = _minmax(upcast(x).detach().reshape(-1, h * w))
    m = unit.shape[0]
    ys = torch.arange(h * w, device=x.device) // w
    xs = torch.arange(h * w, device=x.device) % w
    free = torch.ones_like(unit, dtype=torch.bool)
    coords = torch.full((m, n_pos + n_neg, 2), -1, dtype=torch.long, device=x.device)
    labels = torch.full((m, n_pos + n_neg), -1, dtype=torch.long, device=x.device)
    for t in range(n_pos + n_neg):
        weight = (unit if t < n_pos else 1 - unit).masked_fill(~free, 0.0)
        if generator is None:
            valid = free.any(-1)
            pick = torch.where(free, unit if t < n_pos else -unit, -math.inf).argmax(-1)
        else:
            valid = weight.sum(-1) > 0
            probs = torch.where(valid[:, None], weight, torch.ones_like(weight)).double().to(generator.device)
            pick = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(x.device)
        coords[:, t] = torch.where(valid[:, None], torch.stack([xs[pick], ys[pick]], -1), -1)
        labels[:, t] = torch.where(valid, 1 if t < n_pos else 0, -1)
        near = (ys - ys[pick, None]) ** 2 + (xs - xs[pick, None]) ** 2 < min_dist**2
        near[torch.arange(m, device=x.device), pick] = True
        free &= ~(near & valid[:, None])
    return PointPrompts(coords.view(*x.shape[:-2], n_pos + n_neg, 2), labels.view(*x.shape[:-2], n_pos + n_neg))


def attention_gradcam(probs: torch.Tensor, grads: torch.Tensor, *, rows: TokenSelection | None = None
                      ) -> torch.Tensor:
    """Grad-CAM on attention (LAVIS ``compute_gradcam``, used by AGLA): ``mean_h relu(grads) * probs``.

    Args:
        probs: attention probabilities ``(..., H, Nq, Nk)`` (e.g. cross-attention of text rows over image patches),
            floating.
        grads: the gradient of the score (AGLA: the image-text matching logit) with respect to ``probs``, same
            shape and dtype.
        rows: None for one map per query row ``(..., Nq, Nk)``; a selection of query rows (slice, indices, boolean
            ``(Nq,)`` / ``(..., Nq)`` mask) to average over, ``(..., Nk)`` (AGLA: the text tokens without the
            first and last special tokens).

    Returns:
        The relevance map, in the inputs' dtype; differentiable in both inputs.

    Raises:
        TypeError: not floating tensors, or different dtypes.
        ValueError: fewer than 3 dimensions, different shapes; ``rows`` out of range or selecting no row.

    Examples:
        >>> import torch
        >>> from nearfar.steer import attention_gradcam
        >>> p = torch.full((1, 2, 3, 4), 0.25); g = torch.randn(1, 2, 3, 4)
        >>> attention_gradcam(p, g, rows=slice(1, 3)).shape
        torch.Size([1, 4])
    """
    p = floating_tensor(probs, "probs", 3)
    g = floating_tensor(grads, "grads", 3)
    if p.shape != g.shape:
        raise ValueError(f"probs and grads must have one shape, got {tuple(p.shape)} and {tuple(g.shape)}")
    if p.dtype != g.dtype:
        raise TypeError(f"probs and grads must share one dtype, got {p.dtype} and {g.dtype}")
    mask = None
    if rows is not None:
        mask = token_mask(rows, p.shape[-2], name="rows", device=p.device)
        if mask.dim() - 1 > p.dim() - 3:
            raise ValueError(f"rows as a boolean mask must be (Nq,) or (*batch, Nq), got {tuple(mask.shape)}")
        if not bool(mask.any(-1).all()):
            raise ValueError("rows must select at least one query row (in every batch item)")
    cam = (upcast(g).clamp_min(0) * upcast(p)).mean(-3)
    if mask is not None:
        weight = mask.to(cam.dtype).unsqueeze(-1)
        cam = (cam * weight).sum(-2) / weight.sum(-2)
    return cam.to(p.dtype)
