"""HiDiffusion's MSW-MSA on a diffusers UNet, applied where HiDiffusion applies it, on nearfar's engines.

Paper: Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion
Models", ECCV 2024, arXiv 2311.17528. Official code: megvii-research/HiDiffusion, ``hidiffusion/hidiffusion.py``
(``make_diffusers_transformer_block``: MSW-MSA; ``apply_hidiffusion``: where; ``sd15_hidiffusion_key`` and
``sdxl_hidiffusion_key``: which blocks).

MSW-MSA (multi-scale shifted window self-attention) replaces the global self-attention (``attn1``) of the
transformer blocks at the UNet's highest-resolution level that has attention: for SD 1.5/2.1 the blocks of
``down_blocks.0`` and ``up_blocks.3``, for SDXL those of ``down_blocks.1`` and ``up_blocks.1``; the rule here ("the
first down level and the last up level whose blocks have attention, every transformer block in them") gives exactly
those lists on both UNets and a choice of the same kind on others. At each call the ``h x w`` map is cut into 2 x 2
windows of ``(ceil(h/2), ceil(w/2))`` tokens after a cyclic roll by a shift drawn uniformly from ``k * (window //
4)`` for ``k`` in 0..3 (both axes), and each window attends within itself. Cross-attention and every other block
stay dense.

``apply_msw_msa(unet)`` puts ``MSWMSAProcessor`` (a ``NearfarAttnProcessor`` whose pattern is the rolled windows,
``nf.Blocks(window, grid=(h, w), shift=s, wrap=True)``) on those ``attn1`` modules and ``NearfarAttnProcessor`` on
the others, so the whole UNet runs on ``nearfar.attend`` and ``nearfar.steer`` sees every call.

What differs from HiDiffusion's code: the windows are a pattern on the unpartitioned sequence (no partition and
reverse copies; the same outputs, tested); the shift is drawn from this processor's ``generator`` (HiDiffusion:
``torch.rand(1)``, the global generator); a map with an odd side is not interpolated to an even size and back
(HiDiffusion does that, with a warning that quality drops): on such an axis the window grid is Swin's masked shift
(``wrap=False``), a smaller last window and no wrap-around. RAU-Net, HiDiffusion's other half (resolution-aware
down/upsampling on a schedule of steps), is not part of this.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..patterns import Blocks, Pattern
from .diffusers import NearfarAttnProcessor, use_nearfar

__all__ = ["MSWMSAProcessor", "apply_msw_msa", "msw_msa_blocks"]


class MSWMSAProcessor(NearfarAttnProcessor):
    """``NearfarAttnProcessor`` whose self-attention is HiDiffusion's MSW-MSA (see the module docstring).

    Args:
        generator: Where the per-call shift is drawn from (default: a ``torch.Generator`` seeded with 0).
        engine: ``attend``'s engine.

    Attributes:
        last_shift: The ``(sh, sw)`` of the last call (None before one).

    Examples:
        >>> import torch
        >>> from diffusers.models.attention_processor import Attention
        >>> from nearfar.integrations.hidiffusion import MSWMSAProcessor
        >>> attn = Attention(16, heads=2, dim_head=8).eval()
        >>> attn.set_processor(MSWMSAProcessor(torch.Generator().manual_seed(3)))
        >>> attn(torch.randn(1, 16, 8, 12)).shape, attn.processor.last_shift in [(0, 0), (1, 1), (2, 2), (3, 3)]
        (torch.Size([1, 16, 8, 12]), True)
    """

    def __init__(self, generator: torch.Generator | None = None, engine: str = "auto") -> None:
        super().__init__(pattern=self.windows, engine=engine)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.last_shift: tuple[int, int] | None = None
        self._shift = (0, 0)
        self._shifted: dict[tuple[tuple[int, int], tuple[int, int]], Pattern] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r})"

    @staticmethod
    def window(h: int, w: int) -> tuple[int, int]:
        """HiDiffusion's window of an ``h x w`` map: 2 x 2 windows, ``(ceil(h/2), ceil(w/2))``."""
        return math.ceil(h / 2), math.ceil(w / 2)

    def windows(self, h: int, w: int) -> Pattern:
        """The rolled windows of an ``h x w`` map at the shift drawn for this call."""
        size = self.window(h, w)
        wrap = h % 2 == 0 and w % 2 == 0
        shift = (min(self._shift[0], size[0] - 1), min(self._shift[1], size[1] - 1))
        return Blocks(size, grid=(h, w), shift=shift, wrap=wrap)

    def pattern_for(self, n: int, hw: tuple[int, int] | None) -> Pattern | None:
        hw = hw if hw is not None else self.grid(n)
        size = self.window(*hw)
        k = int(torch.randint(0, 4, (1,), generator=self.generator))  # HiDiffusion: 4 equally likely shifts
        self._shift = (size[0] // 4 * k, size[1] // 4 * k)
        self.last_shift = self._shift
        key = (hw, self._shift)
        if key not in self._shifted:
            self._shifted[key] = self.windows(*hw)
        return self._shifted[key]


def msw_msa_blocks(unet: nn.Module) -> list[str]:
    """The names of the ``attn1`` modules that HiDiffusion's rule gives MSW-MSA (see the module docstring).

    Raises:
        ValueError: ``unet`` has no ``down_blocks``/``up_blocks`` with transformer blocks.
    """
    def level_blocks(level: Any, prefix: str) -> list[str]:
        names = []
        for i, attention in enumerate(getattr(level, "attentions", None) or []):
            for j, _ in enumerate(getattr(attention, "transformer_blocks", [])):
                names.append(f"{prefix}.attentions.{i}.transformer_blocks.{j}.attn1")
        return names

    down = [level_blocks(b, f"down_blocks.{i}") for i, b in enumerate(getattr(unet, "down_blocks", []))]
    up = [level_blocks(b, f"up_blocks.{i}") for i, b in enumerate(getattr(unet, "up_blocks", []))]
    first = next((names for names in down if names), [])
    last = next((names for names in reversed(up) if names), [])
    if not first and not last:
        raise ValueError(f"{type(unet).__name__} has no down_blocks/up_blocks with transformer blocks: MSW-MSA "
                         "applies to a UNet2DConditionModel-like model")
    return first + last


def apply_msw_msa(unet: nn.Module, generator: torch.Generator | None = None, engine: str = "auto") -> list[str]:
    """Put HiDiffusion's MSW-MSA on ``unet``'s highest-resolution self-attention and nearfar's dense processor on
    every other attention module; returns the names of the MSW-MSA modules.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (SD 1.5/2.1, SDXL, or one of the same layout).
        generator: Where the shifts are drawn from (one generator shared by the MSW-MSA modules).
        engine: ``attend``'s engine.

    Raises:
        ValueError: ``unet`` has no transformer blocks in its down/up levels.
    """
    names = set(msw_msa_blocks(unet))
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def factory(name: str, attn: Any) -> NearfarAttnProcessor:
        if name in names:
            return MSWMSAProcessor(gen, engine=engine)
        return NearfarAttnProcessor(engine=engine)

    use_nearfar(unet, factory)
    return sorted(names)
