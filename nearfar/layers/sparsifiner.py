"""Sparsifiner: learned instance-dependent sparse attention, channel-last ``(B, H, W, C)`` in and out.

Paper: Wei, Duke, Jiang, Aarabi, Taylor, Shkurti, "Sparsifiner: Learning Sparse Instance-Dependent Attention for
Efficient Vision Transformers" (CVPR 2023, arXiv 2303.13755). Official code: lim142857/Sparsifiner,
``src/models/sparsifiner.py`` (``MaskPredictor``, ``Attention``), ``src/losses.py`` (``NewLoss``),
``src/engine.py`` (the L1 term), ``experiments-results-analysis/experiments/sparsifiner_default_config.yaml``.

A low-rank connectivity predictor (weights shared across heads) scores every (query, key) pair: ``q' = proj_c_q(q)``,
``k' = proj_c_k(k)`` (head dim ``d -> d // reduce_c_factor``), keys down-projected along the token axis by
``proj_n`` (``N x n'``, ``n' = num_tokens // reduce_n_factor``), coefficients ``softmax(h^-0.5 q' k'^T proj_n)``
(scale: number of heads, as the official code) over ``n'`` basis rows, of which the largest ``basis_coef_topk``
are kept; the basis is ``|proj_back_n|^T`` with entries ``<= basis_threshold`` zeroed. ``approx = coef @ basis``
(``(B, h, N, N)``) and each query keeps its ``K = ceil(attn_keep_rate * N)`` highest-scoring keys (``torch.topk``
over the non-negative scores read as integers of the same width: the same order, ~1.7x faster on CPU). The attention
is then exact softmax attention over the kept keys, through ``nearfar.attend`` with the connectivity as an additive
``0 / -inf`` bias written into the dead score buffer (SDPA's fused kernel, forward and backward) instead of the
official dense ``masked_fill`` + softmax + ``nan_to_num``; the mask carries no gradient (the official
``attn_mask.detach_()``). Per-query selected blocks (``SelectedBlocks`` with ``q_block=1``) were measured too and
are ~3x slower than the bias at 14x14 with ``K = N / 4`` keys per query, so the bias is used.

CLS token: the official model runs on DeiT tokens with CLS at index 0. With ``cls_token=True`` the layer takes the
CLS vector beside the map (``layer(x, cls)`` returns ``(out, cls_out)``): it is token 0, its query attends to every
token (the official all-ones CLS row) and it is an ordinary key that patch queries may select; ``proj_n`` and
``proj_back_n`` then have ``1 + H*W`` rows with the CLS row first, as the official ``num_tokens = 197``. With
``cls_token=False`` (the default: a plain ``(B, H, W, C)`` layer) every query is sparse.

Training as the official schedule (``TRAIN_STRATEGY``): phase 1 ``attn_recon`` (``attn_recon=True`` and training
mode) runs *dense* attention and forms ``approx`` from the signed ``proj_back_n^T`` without thresholds or coefficient
top-k, trained by ``attn_recon_loss(teacher_attn)`` (sum-MSE against a dense teacher's attention, CLS rows dropped;
official weight 0.01, averaged over layers); phase 2 ``cls_distill`` (``attn_recon=False``) runs the sparse
attention and trains the backbone with the model-level classification / distillation losses (not part of this
layer). Also available: ``attn_self_distill_loss()`` (sum-MSE against the layer's own dense attention, whose gradient
is kept as in the official code) and ``basis_l1_loss()`` (``||proj_back_n||_1``, the official ``USE_L1`` term).
``loss(teacher_attn=None)`` picks the first or the second. They read ``aux``, which a forward fills in training mode
(or with ``keep_aux=True``).

Parameter names equal the official ``Attention`` (``qkv``, ``proj``, ``mask_predictor.proj_c_q``,
``mask_predictor.proj_c_k``, ``mask_predictor.proj_n``, ``mask_predictor.proj_back_n``), so its weights load.
Differences from the official code:

- Channel-last input; the CLS token, if any, is passed separately (see above).
- ``proj_n`` / ``proj_back_n`` are built for ``input_size`` (default 14x14, DeiT at 224 with patch 16); at another
  map size their patch rows are resized as a ``(H0, W0)`` grid by bilinear interpolation (``align_corners=False``,
  as the official ``resize_pos_embed``), the CLS row kept (the official code only runs at its size), and ``K`` is
  ``ceil(attn_keep_rate * N)`` of the actual ``N``. At ``input_size`` nothing is resized.
- The mask predictor runs only where its result is used: with ``K >= N``, or in the ``attn_recon`` phase, no
  top-k is taken (the official code builds a mask it then ignores there). Ties in ``approx`` are broken by
  ``torch.topk`` as in the official code.
- Not implemented: token pruning (``token_keep_rate``, off in the default configuration), the threshold variants of
  the coefficient and connectivity selection (``USE_TOPK: False``), attention / projection dropout (0).
  ``qkv_bias`` defaults to False as the official ``Attention``; the official ViT passes ``qkv_bias=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_channels_last,
    check_dim_heads,
    check_int_range,
    check_pair,
    check_real_range,
    check_scale,
)
from ..functional import attend, split_qkv
from .position_bias import trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def resize_token_table(table: torch.Tensor, n_cls: int, size: tuple[int, int],
                       new_size: tuple[int, int]) -> torch.Tensor:
    """A per-token table ``(n_cls + H0*W0, r)`` for a ``(H, W)`` map: the patch rows, seen as a ``(H0, W0)`` grid,
    bilinearly resized (``align_corners=False``); the ``n_cls`` leading rows kept. Identity at the same size."""
    if tuple(size) == tuple(new_size):
        return table
    r = table.shape[1]
    grid = table[n_cls:].t().reshape(1, r, *size)
    grid = F.interpolate(grid, size=new_size, mode="bilinear", align_corners=False).reshape(r, -1).t()
    return torch.cat([table[:n_cls], grid], 0) if n_cls else grid


def top_keys(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` of the ``k`` largest of non-negative ``scores`` along the last axis (``torch.topk``,
    unsorted). On CPU the float32/64 scores are ranked as integers of the same width: the bit patterns of
    non-negative floats order as their values, and integer ``topk`` skips the NaN-aware float comparison (~1.7x
    faster on a ``(B, h, N, N)`` score map)."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        scores = scores.view(torch.int32 if scores.dtype == torch.float32 else torch.int64)
    return torch.topk(scores, k, dim=-1, sorted=False).indices


class MaskPredictor(nn.Module):
    """The official ``MaskPredictor`` (low-rank connectivity scores): ``proj_c_q``, ``proj_c_k`` (``d -> d //
    reduce_c_factor``, shared by the heads), ``proj_n`` and ``proj_back_n`` (``num_tokens x n'``, trunc-normal std
    0.02; one shared parameter with ``share_inout_proj``)."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, reduce_n_factor: int, reduce_c_factor: int,
                 share_inout_proj: bool):
        super().__init__()
        head_dim = dim // num_heads
        self.num_tokens, self.reduced_c = num_tokens, head_dim // reduce_c_factor
        self.reduced_n = num_tokens // reduce_n_factor
        self.scale = num_heads ** -0.5  # the official predictor scale: number of heads, not head dim
        self.proj_c_q = nn.Linear(head_dim, self.reduced_c)
        self.proj_c_k = nn.Linear(head_dim, self.reduced_c)
        self.proj_n = nn.Parameter(trunc_normal_(torch.zeros(num_tokens, self.reduced_n)))
        self.proj_back_n = self.proj_n if share_inout_proj else \
            nn.Parameter(trunc_normal_(torch.zeros(num_tokens, self.reduced_n)))

    def forward(self, q: torch.Tensor, k: torch.Tensor, n_cls: int, size: tuple[int, int],
                new_size: tuple[int, int], recon: bool, basis_threshold: float,
                coef_topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Basis coefficients ``(B, h, N - n_cls, n')`` and approximate attention ``(B, h, N - n_cls, N)`` of the
        non-CLS queries. ``recon``: signed basis, no threshold, no coefficient top-k (the official phase 1)."""
        e = resize_token_table(self.proj_n, n_cls, size, new_size)
        f = resize_token_table(self.proj_back_n, n_cls, size, new_size)
        kn = self.proj_c_k(k).transpose(-1, -2) @ e  # (B, h, c', n')
        coef = (self.proj_c_q(q[:, :, n_cls:]) @ kn * self.scale).softmax(-1)
        basis = f.t()
        if not recon:
            basis = basis.abs()
            basis = torch.where(basis > basis_threshold, basis, torch.zeros_like(basis))  # nn.Threshold(t, 0)
            if coef_topk is not None and coef_topk < coef.shape[-1]:
                vals, ind = coef.topk(coef_topk, dim=-1, sorted=False)
                coef = torch.zeros_like(coef).scatter(-1, ind, vals)
        return coef, coef @ basis


@whole_sequence(replicated=("cls",))
class SparsifinerAttention(nn.Module):
    """``SparsifinerAttention(dim, num_heads=8, input_size=14, cls_token=False, attn_keep_rate=0.25,
    reduce_n_factor=8, reduce_c_factor=2, share_inout_proj=False, basis_threshold=0.02, basis_coef_topk=8,
    attn_recon=False, keep_aux=False, qkv_bias=False, qk_scale=None)``: x ``(B, H, W, dim)`` -> same shape (with
    ``cls_token=True``: ``layer(x, cls)`` -> ``(out, cls_out)``). Each query attends to the ``ceil(attn_keep_rate *
    N)`` keys a low-rank predictor scores highest (see the module docstring).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1 (default 8).
        input_size: The map size ``proj_n`` / ``proj_back_n`` are built for: an int or ``(H0, W0)`` (default 14).
        cls_token: The layer takes a CLS token beside the map (default False).
        attn_keep_rate: Fraction of keys each query keeps, in ``(0, 1]`` (default 0.25).
        reduce_n_factor: ``n' = num_tokens // reduce_n_factor``, in ``[1, num_tokens]`` (default 8, the official
            class default; the released configuration uses 6).
        reduce_c_factor: Predictor width ``d // reduce_c_factor``, in ``[1, head_dim]`` (default 2).
        share_inout_proj: One parameter for ``proj_n`` and ``proj_back_n`` (default False).
        basis_threshold: Basis entries ``|F| <= basis_threshold`` are zeroed outside phase 1, >= 0 (default 0.02).
        basis_coef_topk: Basis coefficients kept per query outside phase 1, >= 1, or None for all (default 8).
        attn_recon: Phase 1 (``attn_recon``) while training: dense attention, signed basis (default False).
        keep_aux: Fill ``aux`` in eval mode too (it is always filled in training mode) (default False).
        qkv_bias: Bias on ``qkv`` (default False).
        qk_scale: Attention score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: An int argument is not an int, a flag not a bool, a number not a number.
        ValueError: ``dim`` not a positive multiple of ``num_heads``; any argument out of its range above.

    Examples:
        >>> import torch
        >>> from nearfar import SparsifinerAttention
        >>> layer = SparsifinerAttention(64, 4, input_size=(8, 8))
        >>> layer(torch.randn(2, 8, 8, 64)).shape
        torch.Size([2, 8, 8, 64])
        >>> layer.train()(torch.randn(2, 8, 8, 64)).shape, layer.attn_mask().sum(-1)[0, 0, :3].tolist()
        (torch.Size([2, 8, 8, 64]), [16, 16, 16])
        >>> layer.attn_self_distill_loss().shape
        torch.Size([])
        >>> with_cls = SparsifinerAttention(64, 4, input_size=(8, 8), cls_token=True)
        >>> [t.shape for t in with_cls(torch.randn(2, 8, 8, 64), torch.randn(2, 64))]
        [torch.Size([2, 8, 8, 64]), torch.Size([2, 64])]
    """

    def __init__(self, dim: int, num_heads: int = 8, input_size: int | tuple[int, int] = 14, cls_token: bool = False,
                 attn_keep_rate: float = 0.25, reduce_n_factor: int = 8, reduce_c_factor: int = 2,
                 share_inout_proj: bool = False, basis_threshold: float = 0.02, basis_coef_topk: int | None = 8,
                 attn_recon: bool = False, keep_aux: bool = False, qkv_bias: bool = False,
                 qk_scale: float | None = None):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        self.input_size = check_pair(input_size, "input_size")
        self.cls_token = check_bool(cls_token, "cls_token")
        num_tokens = int(cls_token) + self.input_size[0] * self.input_size[1]
        self.attn_keep_rate = check_real_range(attn_keep_rate, "attn_keep_rate", 0, 1, open_low=True)
        check_int_range(reduce_n_factor, "reduce_n_factor", 1, num_tokens)
        check_int_range(reduce_c_factor, "reduce_c_factor", 1, head_dim)
        check_bool(share_inout_proj, "share_inout_proj")
        self.basis_threshold = check_real_range(basis_threshold, "basis_threshold", 0, math.inf, open_high=True)
        if basis_coef_topk is not None:
            check_int_range(basis_coef_topk, "basis_coef_topk", 1, 2 ** 31 - 1)
        self.basis_coef_topk = basis_coef_topk
        self.attn_recon = check_bool(attn_recon, "attn_recon")
        self.keep_aux = check_bool(keep_aux, "keep_aux")
        check_bool(qkv_bias, "qkv_bias")
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.mask_predictor = MaskPredictor(dim, num_heads, num_tokens, reduce_n_factor, reduce_c_factor,
                                            share_inout_proj)
        #: after a forward in training mode (or with ``keep_aux``): ``approx_attn`` ``(B, h, N - n_cls, N)``,
        #: ``basis_coef``, ``topk_indices`` ``(B, h, N - n_cls, K)`` (None where attention ran dense), ``q``, ``k``
        self.aux: dict[str, torch.Tensor | None] | None = None

    def __getstate__(self) -> dict:
        # aux holds graph tensors of the last forward: copies and pickles (EMA models, checkpoints) leave it out
        state = self.__dict__.copy()
        state["aux"] = None
        return state

    def budget(self, n: int) -> int:
        """Keys kept per non-CLS query for ``n`` tokens: ``min(n, ceil(attn_keep_rate * n))``."""
        return min(n, math.ceil(self.attn_keep_rate * n))

    def forward(self, x: torch.Tensor,
                cls: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention over the keys the predictor picks per query (dense in phase 1 while training).

        Args:
            x: Input ``(B, H, W, dim)``.
            cls: The CLS token ``(B, dim)``, required with ``cls_token=True`` and refused otherwise.

        Returns:
            The output ``(B, H, W, dim)``; with ``cls_token=True`` the tuple ``(out, cls_out (B, dim))``.

        Raises:
            TypeError: ``x`` or ``cls`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; ``cls`` missing, unexpected or not ``(B, dim)``.
        """
        b, spatial, n_img = check_channels_last(x, 2, self.dim)
        tokens = x.reshape(b, n_img, self.dim)
        n_cls = int(self.cls_token)
        if self.cls_token:
            if not isinstance(cls, torch.Tensor):
                raise TypeError(f"cls must be a torch.Tensor (B, {self.dim}) with cls_token=True, got "
                                f"{type(cls).__name__}")
            if tuple(cls.shape) != (b, self.dim):
                raise ValueError(f"cls must be (B, dim) = {(b, self.dim)}, got {tuple(cls.shape)}")
            tokens = torch.cat([cls.unsqueeze(1).to(x.dtype), tokens], 1)
        elif cls is not None:
            raise ValueError("cls was given but the layer was built with cls_token=False")
        n = n_cls + n_img
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        keep = self.budget(n)
        recon = self.training and self.attn_recon
        store = self.training or self.keep_aux
        coef = approx = idx = None
        if store or (keep < n and not recon):
            with torch.set_grad_enabled(torch.is_grad_enabled() and store):  # no graph unless aux keeps it
                coef, approx = self.mask_predictor(q, k, n_cls, self.input_size, spatial, recon,
                                                   self.basis_threshold, self.basis_coef_topk)
        if recon or keep >= n:
            out = attend(q, k, v, scale=self.scale)
        else:
            assert approx is not None  # computed above whenever the attention is sparse
            idx = top_keys(approx.detach(), keep)
            # the scores are dead once ranked (unless aux keeps them): their buffer becomes the bias
            reuse = not store and not n_cls and approx.dtype == q.dtype
            bias = self.connectivity_bias(idx, n, q.dtype, out=approx if reuse else None)
            out = attend(q, k, v, scale=self.scale, bias=bias)
        if store:
            self.aux = {"approx_attn": approx, "basis_coef": coef, "topk_indices": idx, "q": q, "k": k}
        out = self.proj(out.transpose(1, 2).reshape(b, n, self.dim))
        if self.cls_token:
            return out[:, n_cls:].reshape(b, *spatial, self.dim), out[:, 0]
        return out.reshape(b, *spatial, self.dim)

    @staticmethod
    def connectivity_bias(idx: torch.Tensor, n: int, dtype: torch.dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        """Additive bias ``(B, h, N, N)``: 0 at the kept keys ``idx`` of the non-CLS queries and on the CLS rows,
        ``-inf`` elsewhere; written into ``out`` (a dead ``(B, h, N, N)`` buffer) when given."""
        b, h, nq, _ = idx.shape
        n_cls = n - nq
        if out is not None:
            bias = out.fill_(float("-inf"))
        else:
            bias = torch.full((b, h, n, n), float("-inf"), dtype=dtype, device=idx.device)
        bias[:, :, n_cls:].scatter_(-1, idx, 0.0)
        if n_cls:
            bias[:, :, :n_cls] = 0.0
        return bias

    def _aux(self) -> dict[str, torch.Tensor | None]:
        if self.aux is None:
            raise RuntimeError("no forward has filled aux yet: run a forward in training mode (or with keep_aux=True)")
        return self.aux

    def attn_mask(self) -> torch.Tensor:
        """The last forward's connectivity ``(B, h, N, N)`` as bool (CLS rows all True; all True where the attention
        ran dense), as the official ``attn_mask``."""
        aux = self._aux()
        q, k, idx = aux["q"], aux["k"], aux["topk_indices"]
        assert q is not None and k is not None
        b, h, n = q.shape[0], q.shape[1], k.shape[2]
        if idx is None:
            return torch.ones(b, h, n, n, dtype=torch.bool, device=q.device)
        return torch.isfinite(self.connectivity_bias(idx, n, torch.float32))

    def dense_attn(self) -> torch.Tensor:
        """The last forward's dense attention ``softmax(scale q k^T)`` of the non-CLS queries ``(B, h, N - n_cls,
        N)``, differentiable (the official ``unmasked_attn``)."""
        aux = self._aux()
        q, k = aux["q"], aux["k"]
        assert q is not None and k is not None
        return (q[:, :, int(self.cls_token):] @ k.transpose(-1, -2) * self.scale).softmax(-1)

    def attn_recon_loss(self, teacher_attn: torch.Tensor) -> torch.Tensor:
        """Phase-1 loss: ``sum((approx - A_teacher)^2)`` over the non-CLS query rows (official ``ATTN_RECON``, MSE
        with ``reduction='sum'``; weight 0.01 and the mean over layers are the caller's).

        Args:
            teacher_attn: A dense teacher's attention ``(B, h, N, N)`` for the same input (CLS row first).

        Raises:
            RuntimeError: No forward filled ``aux``.
            ValueError: ``teacher_attn`` of another shape.
        """
        approx = self._aux()["approx_attn"]
        assert approx is not None
        want = (approx.shape[0], approx.shape[1], approx.shape[3], approx.shape[3])
        if not isinstance(teacher_attn, torch.Tensor) or tuple(teacher_attn.shape) != want:
            raise ValueError(f"teacher_attn must be a tensor (B, h, N, N) = {want}, got "
                             f"{getattr(teacher_attn, 'shape', type(teacher_attn).__name__)}")
        return (approx - teacher_attn[:, :, int(self.cls_token):].to(approx.dtype)).square().sum()

    def attn_self_distill_loss(self) -> torch.Tensor:
        """``sum((approx - A_dense)^2)`` against this layer's own dense attention (official ``ATTN_SELF_DISTILL``,
        MSE sum; the target is not detached, as there).

        Raises:
            RuntimeError: No forward filled ``aux``.
        """
        approx = self._aux()["approx_attn"]
        assert approx is not None
        return (approx - self.dense_attn()).square().sum()

    def basis_l1_loss(self) -> torch.Tensor:
        """``||proj_back_n||_1``, the official basis-sparsity term (``LOSS.USE_L1``, weight scheduled by the caller)."""
        return self.mask_predictor.proj_back_n.abs().sum()

    def loss(self, teacher_attn: torch.Tensor | None = None) -> torch.Tensor:
        """The predictor's distillation loss after a forward: ``attn_recon_loss(teacher_attn)`` when a teacher's
        attention is given, else ``attn_self_distill_loss()``."""
        if teacher_attn is not None:
            return self.attn_recon_loss(teacher_attn)
        return self.attn_self_distill_loss()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, input_size={self.input_size}, "
                f"cls_token={self.cls_token}, attn_keep_rate={self.attn_keep_rate}, "
                f"reduced_n={self.mask_predictor.reduced_n}, reduced_c={self.mask_predictor.reduced_c}, "
                f"attn_recon={self.attn_recon}")


register(Mechanism(
    name="sparsifiner",
    paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers "
          "(CVPR 2023, arXiv 2303.13755)",
    repo="lim142857/Sparsifiner", family="routed", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: SparsifinerAttention(dim, num_heads, **kw), cls=SparsifinerAttention,
    notes="Top-25% keys per query from a low-rank predictor (n' = num_tokens/8, d/2, basis threshold 0.02, top-8 "
          "coefficients); the predictor's tables are built for input_size (default 14x14, DeiT) and bilinearly "
          "resized at other sizes. The predictor trains only by its own losses (attn_recon phase: dense attention "
          "+ attn_recon_loss against a teacher); on a task loss alone it stays at its initialisation."))
