"""Key blocks chosen at run time: ``SelectedBlocks``, the ``blocks=`` argument of ``attend``.

Content-routed attention (MoBA, NSA's selection branch, SeerAttention, Quest, HiP...) decides *from the data*
which key blocks each query block reads. ``SelectedBlocks`` carries that choice in FlexAttention's block-list
format, so one selection moves between nearfar and ``torch.nn.attention.flex_attention.BlockMask`` unchanged:

- ``kv_num_blocks (B, H, QB)``: how many key blocks query block ``r`` of head ``h`` of batch item ``b`` reads;
- ``kv_indices (B, H, QB, KB)``: which, in the first ``kv_num_blocks`` entries (the rest is ignored);
- ``q_block`` / ``kv_block``: block sizes in tokens; query ``i`` is in block ``i // q_block``, key ``j`` in
  ``j // kv_block`` (indices into the ``q`` and ``k`` tensors, as Flex).

``B`` is the batch size or 1 (shared by every item); ``H`` is the number of query heads (each head selects its
own blocks, as MoBA), of key/value heads (a GQA group shares one selection, as NSA) or 1. Unlike Flex, an entry
may be -1 (no block) and may repeat (read once): routing ops that pad or force blocks need no clean-up.
The pairs a selection allows are (query, key) in a selected block **and** allowed by ``within`` (None: all of
the block; ``Causal()``: token-exact causality inside the blocks, Flex's ``mask_mod``). ``attend`` takes the
union of these pairs and its ``pattern``'s; with ``blocks`` given, ``pattern=None`` means no static pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_positive_int
from .patterns import Pattern, PerHead, Tiles


@dataclass(frozen=True, eq=False)
class SelectedBlocks:
    """Key blocks per (batch item, head, query block), in FlexAttention's block-list format.

    Args:
        kv_num_blocks: Integer tensor ``(B or 1, H, QB)``, entries in ``[0, KB]``.
        kv_indices: Integer tensor ``(B or 1, H, QB, KB)``: key-block indices in ``[0, ceil(Nk / kv_block))``, or -1
            for none; only the first ``kv_num_blocks`` entries of a row count, repeats count once.
        q_block: Query block size in tokens (>= 1); ``QB`` must be ``ceil(Nq / q_block)``.
        kv_block: Key block size in tokens (>= 1); default ``q_block``.
        within: A pattern that further restricts the selected pairs (e.g. ``Causal()``), or None for whole blocks.

    Raises:
        TypeError: If a tensor is not an integer tensor, a size not an int, or ``within`` not a (non-PerHead)
            pattern.
        ValueError: If the shapes disagree with each other or a size is < 1 (checked against the attention's
            shapes by ``attend``).

    Examples:
        >>> import torch, nearfar as nf
        >>> q = torch.randn(1, 2, 8, 4)
        >>> num = torch.tensor([[[1, 1]]])                 # one head, two query blocks of 4: one key block each
        >>> idx = torch.tensor([[[[0, -1], [0, -1]]]])      # both read key block 0
        >>> sel = nf.SelectedBlocks(num, idx, q_block=4)
        >>> out = nf.attend(q, q, q, nf.SlidingWindow(left=1) & nf.Causal(), blocks=sel)   # window ∪ block 0
        >>> sel.pair_mask(8, 8, 2, 2)[0, 0].int()[5].tolist()
        [1, 1, 1, 1, 0, 0, 0, 0]
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_block: int
    kv_block: int | None = None
    within: Pattern | None = None

    def __post_init__(self) -> None:
        for name in ("kv_num_blocks", "kv_indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or \
                    t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got "
                                f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        check_positive_int(self.q_block, "q_block")
        if self.kv_block is not None:
            check_positive_int(self.kv_block, "kv_block")
        if self.within is not None and (not isinstance(self.within, Pattern) or isinstance(self.within, PerHead)):
            raise TypeError(f"within must be a (non-PerHead) Pattern or None, got {type(self.within).__name__}")
        num, idx = self.kv_num_blocks, self.kv_indices
        if num.dim() != 3 or idx.dim() != 4 or tuple(idx.shape[:3]) != tuple(num.shape):
            raise ValueError(f"kv_num_blocks must be (B, H, QB) and kv_indices (B, H, QB, KB) with the same B, H, QB; "
                             f"got {tuple(num.shape)} and {tuple(idx.shape)}")
        if num.device != idx.device:
            raise ValueError(f"kv_num_blocks is on {num.device}, kv_indices on {idx.device}")

    @property
    def k_block(self) -> int:
        """The key block size (``kv_block``, or ``q_block`` when not given)."""
        return self.kv_block if self.kv_block is not None else self.q_block

    def check(self, b: int, hq: int, hkv: int, nq: int, nk: int, device: torch.device) -> None:
        """Raise ValueError if this selection does not fit attention of ``b`` items, ``hq``/``hkv`` heads, ``nq``
        queries and ``nk`` keys on ``device`` (one reduction over the used entries checks their range).

        Args:
            b: Batch size.
            hq: Query heads.
            hkv: Key/value heads.
            nq: Queries.
            nk: Keys.
            device: The attention's device.

        Raises:
            ValueError: A shape, device or index out of range (named, with the allowed range).
        """
        num, idx = self.kv_num_blocks, self.kv_indices
        bs, hs, qb, kb = idx.shape
        if bs not in (1, b):
            raise ValueError(f"blocks: batch dim of kv_num_blocks/kv_indices must be 1 or B={b}, got {bs}")
        if hs not in (1, hkv, hq):
            raise ValueError(f"blocks: head dim must be 1, Hkv={hkv} or Hq={hq}, got {hs}")
        want = (nq + self.q_block - 1) // self.q_block
        if qb != want:
            raise ValueError(f"blocks: QB must be ceil(Nq / q_block) = ceil({nq} / {self.q_block}) = {want}, got {qb}")
        if num.device != device:
            raise ValueError(f"blocks are on {num.device}, q on {device}")
        if self.within is not None:
            self.within.check(nq, nk)
        nkb = (nk + self.k_block - 1) // self.k_block
        if num.numel() == 0 or kb == 0 or num.device.type == "meta":
            return
        lo, hi = torch.aminmax(num)
        if int(lo) < 0 or int(hi) > kb:
            raise ValueError(f"blocks: kv_num_blocks must be in [0, KB={kb}], got values in [{int(lo)}, {int(hi)}]")
        s = min(kb, int(hi))
        if s:
            used = torch.arange(s, device=device) < num[..., None]
            vals = idx[..., :s][used]
            if vals.numel():
                lo, hi = torch.aminmax(vals)
                if int(lo) < -1 or int(hi) >= nkb:
                    raise ValueError(f"blocks: used kv_indices must be -1 (none) or in [0, ceil(Nk / kv_block)) = "
                                     f"[0, {nkb}), got values in [{int(lo)}, {int(hi)}]")

    def normalized(self, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection as ``(indices, valid)``, both ``(B', H', QB, S)``: each row's blocks in ascending order,
        each once, ``S`` the most any row uses; ``indices`` is 0 where ``valid`` is False (a safe gather index).

        Args:
            nk: Number of keys.

        Returns:
            ``(indices int64, valid bool)``.
        """
        num, idx = self.kv_num_blocks.long(), self.kv_indices.long()
        nkb = (nk + self.k_block - 1) // self.k_block
        s = min(idx.shape[-1], int(num.max())) if num.numel() and idx.shape[-1] else 0
        idx = idx[..., :s]
        used = (torch.arange(s, device=idx.device) < num[..., None]) & (idx >= 0)
        key = torch.where(used, idx, nkb).sort(-1).values
        valid = key < nkb
        if s > 1:
            valid[..., 1:] &= key[..., 1:] != key[..., :-1]
        return torch.where(valid, key, 0), valid

    def block_table(self, nk: int) -> torch.Tensor:
        """The selection as a bool table ``(B', H', QB, ceil(Nk / kv_block))``: True = the block is selected.

        Args:
            nk: Number of keys.

        Returns:
            The bool table.
        """
        idx, valid = self.normalized(nk)
        nkb = (nk + self.k_block - 1) // self.k_block
        table = torch.zeros(*idx.shape[:3], nkb + 1, dtype=torch.bool, device=idx.device)
        return table.scatter_(-1, torch.where(valid, idx, nkb), True)[..., :nkb]

    def pair_mask(self, nq: int, nk: int, hq: int, hkv: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The (query, key) pairs the selection allows, ``within`` included, as a bool ``(B', Hq or 1, Nq, Nk)``
        tensor: the reference the engines are tested against (materialises ``Nq x Nk`` per head). With ``rows``
        (int64 query indices ``(B''|1, H''|1, R)``), only those rows: ``(B'|B'', Hq|1, R, Nk)``.

        Args:
            nq: Queries.
            nk: Keys.
            hq: Query heads.
            hkv: Key/value heads (a per-KV-head selection is repeated over its query heads).
            rows: The query rows to answer for (default: all of them, in order).

        Returns:
            The bool mask; True = may attend.
        """
        table = self.block_table(nk)
        if table.shape[1] not in (1, hq):
            table = table.repeat_interleave(hq // hkv, dim=1)
        dev = table.device
        if rows is None:
            rows = torch.arange(nq, device=dev).view(1, 1, -1)
        b = torch.arange(table.shape[0], device=dev).view(-1, 1, 1)
        h = torch.arange(table.shape[1], device=dev).view(1, -1, 1)
        cols = torch.arange(nk, device=dev)
        pairs = table[b, h, rows // self.q_block][..., cols // self.k_block]
        if self.within is not None:
            pairs = pairs & self.within.allowed(rows[..., None], cols, nq, nk)
        return pairs

    @classmethod
    def from_block_mask(cls, block_mask: object, within: Pattern | None = None) -> SelectedBlocks:
        """The key blocks of a FlexAttention ``BlockMask`` (its partial and full blocks together); its
        ``mask_mod`` is not carried over: pass the pattern it computes as ``within``.

        Args:
            block_mask: A ``torch.nn.attention.flex_attention.BlockMask``.
            within: The restriction inside the blocks (see the class).

        Returns:
            The selection.
        """
        num, idx = block_mask.kv_num_blocks, block_mask.kv_indices  # type: ignore[attr-defined]
        full_num = getattr(block_mask, "full_kv_num_blocks", None)
        if full_num is not None:
            full_idx = block_mask.full_kv_indices  # type: ignore[attr-defined]
            kb = idx.shape[-1]
            live = torch.arange(kb, device=idx.device) < num[..., None]
            live_f = torch.arange(kb, device=idx.device) < full_num[..., None]
            idx = torch.cat([torch.where(live, idx, -1), torch.where(live_f, full_idx, -1)], -1)
            num = torch.full_like(num, idx.shape[-1])
        q_block, kv_block = block_mask.BLOCK_SIZE  # type: ignore[attr-defined]
        return cls(num, idx, q_block=int(q_block), kv_block=int(kv_block), within=within)

    def tiles(self, nq: int, nk: int) -> tuple[Tiles, Tiles]:
        """Query blocks ``(QB, q_block)`` and key blocks ``(KB, kv_block)`` as ``Tiles`` of token indices (-1 past
        the end), for a pattern's tile-level tests.

        Args:
            nq: Queries.
            nk: Keys.

        Returns:
            ``(query tiles, key tiles)``.
        """
        dev = self.kv_indices.device

        def chunks(n: int, size: int) -> torch.Tensor:
            i = torch.arange((n + size - 1) // size * size, device=dev)
            return torch.where(i < n, i, -1).view(-1, size)

        return Tiles(chunks(nq, self.q_block)), Tiles(chunks(nk, self.k_block))
