"""The Routing Transformer's k-means routing: balanced top-w cluster assignment and the EMA k-means centroid
update (the clustering part of ``nearfar.ops.routing``).

Paper and code: Routing Transformer (Roy et al., 2021) -- lucidrains/routing-transformer
``routing_transformer/routing_transformer.py`` (``Kmeans``, ``kmeans_iter``, ``distribution``, ``ema_inplace``).
"""

from __future__ import annotations

import torch

from ..checks import check_bool, check_real_range, check_tensor

__all__ = ["ema_update_centroids", "kmeans_route"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _check_centroids(x: torch.Tensor, centroids: torch.Tensor) -> None:
    check_tensor(x, "x", 4)
    check_tensor(centroids, "centroids", 3)
    if x.dtype != centroids.dtype:
        raise TypeError(f"x and centroids must share one dtype, got {x.dtype}, {centroids.dtype}")
    h, c, d = centroids.shape
    if x.shape[1] != h or x.shape[3] != d or c < 1:
        raise ValueError(f"centroids must be (H, C, d) with C >= 1 for x (B, H, N, d) = {tuple(x.shape)}, "
                         f"got {tuple(centroids.shape)}")


def kmeans_route(x: torch.Tensor, centroids: torch.Tensor, top_w: int, *, normalize: bool = True) -> torch.Tensor:
    """The Routing Transformer's balanced assignment: each cluster takes its ``top_w`` most similar tokens.

    Similarity ``x_hat . mu`` per head (``x_hat`` the unit-norm tokens when ``normalize``, as the Routing
    Transformer normalises q and k; the centroids are used as given, unit-norm by construction). Every cluster
    gets exactly ``top_w`` tokens, so a token may be in several clusters or in none (lucidrains ``distribution``:
    ``topk`` over the tokens, indices sorted; ``KmeansAttention`` runs it on queries and keys separately). Ties go
    to the lower token index.
    Not differentiable (indices).

    Args:
        x: Tokens ``(B, H, N, d)``, floating, any layout.
        centroids: Per-head centroids ``(H, C, d)``, same dtype.
        top_w: Tokens per cluster, in ``[1, N]``.
        normalize: Normalise the tokens to unit norm first.

    Returns:
        Token indices ``(B, H, C, top_w)`` int64, ascending within each cluster.

    Raises:
        TypeError: If a tensor is not floating, the dtypes differ, or an argument has the wrong type.
        ValueError: If the shapes do not fit or ``top_w`` is outside ``[1, N]``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import kmeans_route
        >>> x = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8]]]])
        >>> kmeans_route(x, torch.eye(2)[None], 2).tolist()
        [[[[0, 2], [1, 3]]]]
    """
    _check_centroids(x, centroids)
    n = x.shape[2]
    if not isinstance(top_w, int) or isinstance(top_w, bool):
        raise TypeError(f"top_w must be an int in [1, {n}], got {top_w!r}")
    if not 1 <= top_w <= n:
        raise ValueError(f"top_w must be in [1, {n}] (the number of tokens), got {top_w}")
    check_bool(normalize, "normalize")
    xs = _unit(x) if normalize else x
    sim = torch.matmul(centroids.unsqueeze(0), xs.detach().transpose(-1, -2))  # (B, H, C, N)
    top = sim.sort(dim=-1, descending=True, stable=True).indices[..., :top_w]
    return top.sort(dim=-1).values


def ema_update_centroids(centroids: torch.Tensor, x: torch.Tensor, decay: float = 0.999, *,
                         normalize: bool = True) -> torch.Tensor:
    """One Routing Transformer k-means step on ``x``, blended into ``centroids`` by an exponential moving average.

    Per head: every token (unit-normed when ``normalize``) goes to its most similar centroid (ties: the lower
    cluster); a cluster's new mean is the unit-normed sum of its tokens over the batch and the sequence (a cluster
    with no token keeps its centroid); then ``decay * centroids + (1 - decay) * new`` (lucidrains
    ``kmeans_iter`` and ``ema_inplace``; no renormalisation after the blend). Computed without gradient; returns a
    new tensor (the input is not modified).

    Args:
        centroids: Per-head centroids ``(H, C, d)``, floating.
        x: Tokens ``(B, H, N, d)``, same dtype.
        decay: EMA decay in ``[0, 1]``.
        normalize: Normalise the tokens to unit norm first.

    Returns:
        The updated centroids ``(H, C, d)``.

    Raises:
        TypeError: If a tensor is not floating, the dtypes differ, or an argument has the wrong type.
        ValueError: If the shapes do not fit or ``decay`` is outside ``[0, 1]``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import ema_update_centroids
        >>> x = torch.tensor([[[[2.0, 0.0], [0.0, 3.0]]]])
        >>> ema_update_centroids(torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]), x, decay=0.5).tolist()
        [[[1.0, 0.0], [0.30000001192092896, 0.8999999761581421]]]
    """
    _check_centroids(x, centroids)
    a = check_real_range(decay, "decay", 0.0, 1.0)
    check_bool(normalize, "normalize")
    with torch.no_grad():
        xs = _unit(x) if normalize else x
        b, h, n, d = xs.shape
        c = centroids.shape[1]
        sim = torch.matmul(xs, centroids.transpose(-1, -2))  # (B, H, N, C)
        assign = sim.argmax(dim=-1) if c > 1 else torch.zeros(b, h, n, dtype=torch.long, device=x.device)
        idx = assign.permute(1, 0, 2).reshape(h, b * n, 1).expand(h, b * n, d)
        sums = xs.new_zeros(h, c, d).scatter_add_(1, idx, xs.permute(1, 0, 2, 3).reshape(h, b * n, d))
        counts = torch.zeros(h, c, dtype=torch.long, device=x.device).scatter_add_(
            1, assign.permute(1, 0, 2).reshape(h, b * n), torch.ones(h, b * n, dtype=torch.long, device=x.device))
        new = torch.where((counts > 0)[..., None], _unit(sums), centroids)
        return centroids * a + new * (1.0 - a)
