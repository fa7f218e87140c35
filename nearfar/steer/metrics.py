"""Metrics on heads, hidden states and attention maps.

- ``head_divergence``: He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence"
  (VHD/VHR, ACL 2025, arXiv 2412.13949; code ``jinghan1he/VHR``, not in our index): the distance between a head's
  output (before ``W_O``) with and without the image in context, ``||z(image+text) - z(text)||_2``; "cos" is
  ``1 - cos(z_a, z_b)``, a scale-free variant of ours.
- ``massive_dims`` / ``sink_tokens``: Kang et al., "See What You Are Told: Visual Attention Sink in Large
  Multimodal Models" (VAR, ICLR 2025, arXiv 2503.03321; code ``MICV-yonsei/VisAttnSink``, ``DimProspector``). A
  token is a sink when, after RMS normalisation without the learned scale (``x / sqrt(mean(x^2) + 1e-6)``, in
  float32), the largest absolute value over a few fixed "sink dimensions" exceeds ``tau = 20`` (strictly). The
  code hard-codes the dimensions per base LLM (LLaMA-2-7B: 1415 and 2533; LLaMA-2-13B: 2100 and 4743); when
  ``dims`` is None we pick them from the data instead: ``massive_dims`` ranks dimensions by their largest
  normalised magnitude over all tokens (the "massive activations" of Sun et al., arXiv 2402.17762) and
  ``sink_tokens`` takes the top 2.
- ``map_overlap`` / ``map_retention``: Agarwal et al., "A-STAR: Test-time Attention Segregation and Retention for
  Text-to-image Synthesis" (ICCV 2023, arXiv 2306.14544; no official code found): the segregation loss
  ``sum_p min(A_i, A_j) / sum_p (A_i + A_j)`` (summed over concept pairs when only one tensor of maps is given) and
  the retention loss ``1 - sum_p A M / sum_p (A + M - A M)`` (one minus a soft IoU with the previous step's
  binarised map ``M``). Both are differentiable in the maps (A-STAR's latent update needs it).
- ``entropy`` (Shannon, nats, ``0 log 0 = 0``) and ``spatial_entropy``: Peruzzo et al., "Spatial Entropy as an
  Inductive Bias for Vision Transformers" (arXiv 2206.04636; code ``helia95/SAR``, ``BlobLoss``): the map minus
  ``offset`` times its mean, kept where positive; the 8-connected components of what is left; the entropy of the
  components' shares of the remaining mass. ``offset=1`` as SAR; Kang et al. (CVPR 2025, localisation heads) use
  ``offset=2`` and ``threshold=1e-3``. Differentiable through the masses (the components are fixed); ``inf``
  where nothing is left (a flat map), as the localisation-heads code returns.
- ``mass_on``: the attention mass on a key group (VAR's image mass, AttenCraft's per-concept shares).

How this differs from the official codes: VAR's sink dimensions are constants per model, ours can come from the
data (``massive_dims``); SAR finds components with OpenCV on a fixed 14 x 14 grid and adds ``1e-9`` to every
pixel, the localisation-heads code uses scipy and divides the component masses by the mass of all pixels above
the offset; here components come from torch on any grid and the shares are of the components' total mass (they
sum to 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_int_range, check_positive_int, check_real_range
from .tokens import TokenSelection, floating_tensor, token_mask, upcast

__all__ = ["entropy", "head_divergence", "map_overlap", "map_retention", "mass_on", "massive_dims",
           "sink_tokens", "spatial_entropy"]




def _dim(dim: object, ndim: int, name: str = "dim") -> int:
    return check_int_range(dim, name, -ndim, ndim - 1) % ndim


def head_divergence(out_a: torch.Tensor, out_b: torch.Tensor, metric: str = "l2", *, dim: int = -1
                    ) -> torch.Tensor:
    """Per-head divergence between two runs' head outputs (VHD: with vs without the image).

    Args:
        out_a: per-head outputs before the output projection, e.g. ``(B, H, N, d)``, floating.
        out_b: the other run's, the same shape and dtype.
        metric: "l2" (VHD: the Euclidean distance) or "cos" (``1 - cosine similarity``; 1 where a vector is 0).
        dim: the feature axis reduced (default the last).

    Returns:
        The divergence with ``dim`` removed (e.g. ``(B, H, N)``), in the inputs' dtype; differentiable.

    Raises:
        TypeError: not floating tensors, or different dtypes; ``metric`` not a str.
        ValueError: different shapes; ``metric`` unknown; ``dim`` out of range.

    Examples:
        >>> import torch
        >>> from nearfar.steer import head_divergence
        >>> a = torch.zeros(1, 2, 1, 4); b = a.clone(); b[0, 1, 0, 0] = 3.0
        >>> head_divergence(a, b).flatten().tolist()                   # head 1 moved by 3
        [0.0, 3.0]
    """
    a, b = floating_tensor(out_a, "out_a"), floating_tensor(out_b, "out_b")
    if a.shape != b.shape:
        raise ValueError(f"out_a and out_b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"out_a and out_b must share one dtype, got {a.dtype} and {b.dtype}")
    metric = check_choice(metric, "metric", ("l2", "cos"))
    d = _dim(dim, a.dim())
    wa, wb = upcast(a), upcast(b)
    if metric == "l2":
        out = torch.linalg.vector_norm(wa - wb, dim=d)
    else:
        out = 1 - F.cosine_similarity(wa, wb, dim=d, eps=1e-12)
    return out.to(a.dtype)


def _normalised(hidden: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    h = hidden.float() if hidden.dtype != torch.float64 else hidden
    if norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.abs()


def massive_dims(hidden: torch.Tensor, topk: int, *, norm: str = "rms", eps: float = 1e-6) -> torch.Tensor:
    """The hidden dimensions with the most massive activations (the candidates for VAR's sink dimensions).

    Args:
        hidden: hidden states ``(..., N, D)`` (e.g. ``(B, N, D)``), floating.
        topk: how many dimensions, in ``[1, D]``.
        norm: "rms" (``x / sqrt(mean(x^2) + eps)`` per token, no learned scale, as VAR) or "none".
        eps: the RMS normalisation's epsilon, > 0.

    Returns:
        ``(topk,)`` int64 dimension indices, the most massive first (score: the largest absolute normalised value
        over every token and batch item).

    Raises:
        TypeError: ``hidden`` not a floating tensor.
        ValueError: fewer than 2 dimensions or empty; ``topk`` outside ``[1, D]``; unknown ``norm``; ``eps <= 0``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import massive_dims
        >>> h = torch.randn(2, 6, 16); h[:, 0, 5] = 200.0; h[:, 3, 11] = -300.0
        >>> massive_dims(h, 2).tolist()
        [11, 5]
    """
    h = floating_tensor(hidden, "hidden", 2)
    topk = check_int_range(topk, "topk", 1, h.shape[-1])
    norm = check_choice(norm, "norm", ("rms", "none"))
    eps = check_real_range(eps, "eps", 0.0, math.inf, open_low=True)
    score = _normalised(h, norm, eps).reshape(-1, h.shape[-1]).amax(0)
    return score.topk(topk).indices


def sink_tokens(hidden: torch.Tensor, dims: Sequence[int] | torch.Tensor | None = None, tau: float = 20.0,
                norm: str = "rms", *, eps: float = 1e-6, topk: int = 2) -> torch.Tensor:
    """Sink tokens by massive activation (VAR's ``DimProspector``): ``max_{d in dims} |norm(h)[d]| > tau``.

    Args:
        hidden: hidden states ``(..., N, D)`` (VAR: a decoder layer's input), floating.
        dims: the sink dimensions (indices in ``[0, D)``); None: the ``topk`` of ``massive_dims(hidden)``.
        tau: the threshold, >= 0 (VAR's default 20).
        norm: "rms" (VAR) or "none".
        eps: the RMS normalisation's epsilon, > 0.
        topk: how many dimensions to pick when ``dims`` is None, in ``[1, D]``.

    Returns:
        A boolean ``(..., N)`` mask of the sink tokens.

    Raises:
        TypeError: ``hidden`` not floating; ``dims`` of the wrong type.
        ValueError: as ``massive_dims``; an empty ``dims`` or a dimension outside ``[0, D)``; ``tau < 0``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import sink_tokens
        >>> h = torch.randn(1, 5, 1024); h[0, 2, 7] = 500.0          # |x / rms(x)| ~ 32 > 20 at token 2
        >>> sink_tokens(h, dims=[7]).tolist()
        [[False, False, True, False, False]]
    """
    h = floating_tensor(hidden, "hidden", 2)
    d_model = h.shape[-1]
    tau = check_real_range(tau, "tau", 0.0, math.inf)
    norm = check_choice(norm, "norm", ("rms", "none"))
    eps = check_real_range(eps, "eps", 0.0, math.inf, open_low=True)
    if dims is None:
        topk = check_int_range(topk, "topk", 1, d_model)
        idx = massive_dims(h, topk, norm=norm, eps=eps)
    else:
        mask = token_mask(dims, d_model, name="dims", device=h.device)  # checks types and range
        if mask.dim() != 1 or not bool(mask.any()):
            raise ValueError("dims must name at least one hidden dimension (indices in [0, D))")
        idx = mask.nonzero().squeeze(1)
    return _normalised(h, norm, eps)[..., idx].amax(-1) > tau


def _spatial_dims(x: torch.Tensor, dims: object) -> tuple[int, ...]:
    k = check_int_range(dims, "dims", 1, x.dim())
    return tuple(range(-k, 0))


def _safe_div(num: torch.Tensor, den: torch.Tensor, empty: float) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, empty))


def map_overlap(a: torch.Tensor, b: torch.Tensor | None = None, *, dims: int = 2) -> torch.Tensor:
    """A-STAR's segregation loss: ``sum min(a, b) / sum (a + b)`` over the last ``dims`` (spatial) axes.

    Args:
        a: non-negative maps ``(..., H, W)`` (e.g. the smoothed, head-averaged cross-attention of one concept
            token), floating.
        b: maps broadcastable with ``a``; None: ``a`` is ``(..., C, H, W)`` (one map per concept) and the losses
            of all pairs ``i < j`` of the concept axis are summed, as A-STAR's ``L_seg``.
        dims: the number of trailing spatial axes, in ``[1, a.dim()]`` (2 for ``H, W``; 1 for flat tokens).

    Returns:
        The overlap in ``[0, 1/2]`` per map pair (``(...)``), 0 where both maps are 0; differentiable.

    Raises:
        TypeError: not floating tensors, or different dtypes.
        ValueError: shapes that do not broadcast; ``dims`` out of range; ``b=None`` with fewer than ``dims + 1``
            axes.

    Examples:
        >>> import torch
        >>> from nearfar.steer import map_overlap
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 0.0]]); y = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
        >>> map_overlap(x, y).item(), map_overlap(x, x).item()
        (0.0, 0.5)
    """
    a = floating_tensor(a, "a")
    axes = _spatial_dims(a, dims)
    if b is None:
        if a.dim() < len(axes) + 1:
            raise ValueError(f"with b=None, a must be (..., C, *spatial) with {len(axes)} spatial axes, "
                             f"got {tuple(a.shape)}")
        c = a.shape[-len(axes) - 1]
        i, j = torch.triu_indices(c, c, 1, device=a.device)
        x = upcast(a)
        cdim = x.dim() - len(axes) - 1
        pair = map_overlap(x.index_select(cdim, i), x.index_select(cdim, j), dims=dims)
        return pair.sum(-1).to(a.dtype)
    b = floating_tensor(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"a and b must broadcast, got {tuple(a.shape)} and {tuple(b.shape)}") from None
    wa, wb = upcast(a), upcast(b)
    num = torch.minimum(wa, wb).sum(axes)
    den = (wa + wb).sum(axes)
    return _safe_div(num, den, 0.0).to(a.dtype)


def map_retention(a_t: torch.Tensor, m_prev: torch.Tensor, *, dims: int = 2) -> torch.Tensor:
    """A-STAR's retention loss: ``1 - sum(a m) / sum(a + m - a m)`` (one minus the soft IoU) per map.

    Args:
        a_t: the current maps in ``[0, 1]`` ``(..., H, W)`` (e.g. min-max normalised), floating.
        m_prev: the previous step's masks, broadcastable with ``a_t`` (boolean, or floating in ``[0, 1]``).
        dims: the number of trailing spatial axes, in ``[1, a_t.dim()]``.

    Returns:
        The loss in ``[0, 1]`` per map (``(...)``); 0 where both are empty; differentiable in ``a_t`` (and in a
        floating ``m_prev``).

    Raises:
        TypeError: ``a_t`` not floating; ``m_prev`` neither boolean nor floating.
        ValueError: shapes that do not broadcast; ``dims`` out of range.

    Examples:
        >>> import torch
        >>> from nearfar.steer import map_retention
        >>> m = torch.tensor([[True, False], [False, False]])
        >>> map_retention(m.float(), m).item(), map_retention(1 - m.float(), m).item()
        (0.0, 1.0)
    """
    a = floating_tensor(a_t, "a_t")
    axes = _spatial_dims(a, dims)
    if not isinstance(m_prev, torch.Tensor):
        raise TypeError(f"m_prev must be a torch.Tensor, got {type(m_prev).__name__}")
    if m_prev.dtype != torch.bool and not m_prev.is_floating_point():
        raise TypeError(f"m_prev must be boolean or floating, got {m_prev.dtype}")
    try:
        torch.broadcast_shapes(a.shape, m_prev.shape)
    except RuntimeError:
        raise ValueError(f"a_t and m_prev must broadcast, got {tuple(a.shape)} and {tuple(m_prev.shape)}") from None
    wa = upcast(a)
    m = m_prev.to(wa.dtype)
    inter = (wa * m).sum(axes)
    union = (wa + m - wa * m).sum(axes)
    return (1 - _safe_div(inter, union, 1.0)).to(a.dtype)


def entropy(probs: torch.Tensor, dim: int = -1, *, normalize: bool = False) -> torch.Tensor:
    """Shannon entropy (nats) of distributions along ``dim``, ``0 log 0 = 0``.

    Args:
        probs: non-negative values summing to 1 along ``dim`` (not renormalised), floating.
        dim: the distribution axis.
        normalize: divide by ``log n`` (``n`` the size of ``dim``), giving ``[0, 1]``; 0 when ``n == 1``.

    Returns:
        The entropy with ``dim`` removed, in the input's dtype; differentiable (the gradient at 0 entries is 0).

    Raises:
        TypeError: not a floating tensor; ``normalize`` not a bool.
        ValueError: empty; ``dim`` out of range.

    Examples:
        >>> import torch
        >>> from nearfar.steer import entropy
        >>> entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4]), normalize=True).tolist()
        [0.5, 1.0]
    """
    p = floating_tensor(probs, "probs")
    d = _dim(dim, p.dim())
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    w = upcast(p)
    logp = torch.log(torch.where(w > 0, w, torch.ones_like(w)))
    h = -(w * logp).sum(d)
    if normalize:
        n = p.shape[d]
        h = h / math.log(n) if n > 1 else torch.zeros_like(h)
    return h.to(p.dtype)


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of boolean maps ``(M, H, W)``: 0 off the mask, else the largest flat index
    + 1 in the component (max-propagation over 3 x 3 neighbourhoods until nothing changes)."""
    m, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float64).view(1, h, w).expand(m, h, w)
    labels = labels * mask
    while True:
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def spatial_entropy(maps: torch.Tensor, *, offset: float = 1.0, threshold: float = 0.0) -> torch.Tensor:
    """Spatial entropy of 2D maps over their last two axes: the entropy of the mass shares of the blobs.

    ``r = relu(map - offset * mean(map))``; the 8-connected components of ``r > threshold``; ``p_k`` = the share
    of component ``k`` in the mass of ``r`` on all components; the result is ``-sum_k p_k log p_k`` (0 for one
    blob, ``log K`` for ``K`` equal blobs).

    Args:
        maps: ``(..., H, W)`` maps (e.g. a class token's attention on a patch grid), floating.
        offset: how many means are subtracted before the components are found, >= 0 (SAR: 1; Kang et al.: 2).
        threshold: the level above which a pixel of ``r`` belongs to a component, >= 0.

    Returns:
        ``(...)``, in the maps' dtype; ``inf`` where no pixel is above the threshold; differentiable through the
        masses (the components are held fixed).

    Raises:
        TypeError: not a floating tensor.
        ValueError: fewer than 2 dimensions or empty; ``offset`` or ``threshold`` negative.

    Examples:
        >>> import torch
        >>> from nearfar.steer import spatial_entropy
        >>> one = torch.zeros(6, 6); one[1:3, 1:3] = 1.0
        >>> two = one.clone(); two[4:6, 4:6] = 1.0
        >>> round(spatial_entropy(one).item(), 4), round(spatial_entropy(two).item(), 4)   # 0 and log 2
        (0.0, 0.6931)
    """
    x = floating_tensor(maps, "maps", 2)
    offset = check_real_range(offset, "offset", 0.0, math.inf)
    threshold = check_real_range(threshold, "threshold", 0.0, math.inf)
    h, w = x.shape[-2:]
    flat = upcast(x).reshape(-1, h, w)
    r = torch.relu(flat - offset * flat.mean((-2, -1), keepdim=True))
    labels = _components((r > threshold).detach())
    mass = torch.zeros(flat.shape[0], h * w + 1, dtype=r.dtype, device=r.device)
    mass = mass.scatter_add(1, labels.reshape(flat.shape[0], -1), r.reshape(flat.shape[0], -1))[:, 1:]
    total = mass.sum(-1, keepdim=True)
    p = _safe_div(mass, total.expand_as(mass), 0.0)
    logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    se = 0.0 - (p * logp).sum(-1)
    se = torch.where(total.squeeze(-1) > 0, se, torch.full_like(se, math.inf))
    return se.reshape(x.shape[:-2]).to(x.dtype)


def mass_on(probs: torch.Tensor, group: TokenSelection) -> torch.Tensor:
    """The attention mass on a key group: ``sum_{j in group} probs[..., j]``.

    Args:
        probs: attention probabilities ``(..., Nk)`` (keys last, e.g. ``(B, H, Nq, Nk)``), floating.
        group: the keys: a slice, indices or a boolean ``(Nk,)`` / ``(..., Nk)`` mask broadcastable to ``probs``.

    Returns:
        ``(...)``: the mass, in the input's dtype; differentiable.

    Raises:
        TypeError: not floating; ``group`` of the wrong type.
        ValueError: empty ``probs``; ``group`` out of range or of the wrong length.

    Examples:
        >>> import torch
        >>> from nearfar.steer import mass_on
        >>> mass_on(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), [0, 3])
        tensor([0.5000])
    """
    p = floating_tensor(probs, "probs")
    check_positive_int(p.shape[-1], "probs.shape[-1]")
    mask = token_mask(group, p.shape[-1], name="group", device=p.device)
    try:
        torch.broadcast_shapes(mask.shape, p.shape)
    except RuntimeError:
        raise ValueError(f"group as a mask {tuple(mask.shape)} must broadcast to probs {tuple(p.shape)}") from None
    w = upcast(p)
    return (w * mask).sum(-1).to(p.dtype)
