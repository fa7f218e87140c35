"""Attention sites of a model and named token groups.

A **site** is one attention module of a model: every nearfar layer (the classes ``nearfar.mechanisms()`` registers)
is one, found by ``find_sites`` with its name in the model, its layer index (order of appearance), its kind
(self-, cross- or joint attention) and its head layout. A site built inside another site (a wrapper around an inner
attention layer) belongs to the outer one. ``TokenGroups`` names sets of token positions (image tokens, text
tokens, sinks, a subject's tokens, a region of a 2D map) so edits and statistics can say "the image tokens"
instead of index arithmetic.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..layers.registry import mechanisms

KINDS = ("self", "cross", "joint")


@dataclass(frozen=True, eq=False)
class Site:
    """One attention module of a model.

    Attributes:
        name: Its qualified name in the model (``model.get_submodule(name)`` is ``module``).
        module: The module.
        layer: Its index among the model's sites, in ``named_modules`` order (0-based).
        kind: ``"self"``, ``"cross"`` (keys from a context) or ``"joint"`` (several modalities in one sequence).
        num_heads: Query heads, where the module says (None otherwise).
        num_kv_heads: Key/value heads, where the module says.
    """

    name: str
    module: nn.Module
    layer: int
    kind: str
    num_heads: int | None = None
    num_kv_heads: int | None = None

    def __repr__(self) -> str:
        return f"Site({self.name!r}, layer={self.layer}, kind={self.kind!r}, {type(self.module).__name__})"


def _attention_classes() -> tuple[type, ...]:
    return tuple({m.cls for m in mechanisms() if m.cls is not None})


#: rules that make other libraries' attention modules sites: ``rule(module) -> (kind, num_heads, num_kv_heads)``
#: or None (``register_site_rule``; the integrations with Hugging Face transformers and diffusers add theirs)
_SITE_RULES: list[Callable[[nn.Module], tuple[str, int | None, int | None] | None]] = []


def register_site_rule(rule: Callable[[nn.Module], tuple[str, int | None, int | None] | None]) -> None:
    """Make modules of another library sites of ``find_sites``: ``rule(module)`` returns ``(kind, num_heads,
    num_kv_heads)`` for a module that is an attention site, else None. Such a module's attention must run through
    ``nearfar.attend`` (an integration's attention function or processor) for ``control`` to see its calls."""
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {type(rule).__name__}")
    if rule not in _SITE_RULES:
        _SITE_RULES.append(rule)


def _site_of(module: nn.Module, classes: tuple[type, ...]) -> tuple[str, int | None, int | None] | None:
    if isinstance(module, classes):
        return _kind(module), getattr(module, "num_heads", None), getattr(module, "num_kv_heads", None)
    for rule in _SITE_RULES:
        got = rule(module)
        if got is not None:
            return got
    return None


def _kind(module: nn.Module) -> str:
    if getattr(module, "joint", False):
        return "joint"
    return "cross" if getattr(module, "cross", False) else "self"


def find_sites(model: nn.Module, kind: str | Iterable[str] | None = None, layers: int | Iterable[int] | None = None,
               name_glob: str | None = None, classes: tuple[type, ...] | None = None) -> list[Site]:
    """The attention sites of ``model``, outermost first, filtered.

    Args:
        model: Any module (a nearfar layer, model, or a model that contains nearfar layers).
        kind: Keep only these kinds (``"self"``, ``"cross"``, ``"joint"``).
        layers: Keep only these layer indices (an int or an iterable of ints; negative counts from the end).
        name_glob: Keep only sites whose name matches this ``fnmatch`` pattern (e.g. ``"blocks.*.attn"``).
        classes: The module classes that are sites (default: every registered nearfar mechanism class); the rules
            of ``register_site_rule`` add other libraries' attention modules.

    Returns:
        The sites, in ``named_modules`` order, their ``layer`` numbered before filtering.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: An unknown ``kind``.

    Examples:
        >>> import nearfar as nf
        >>> from nearfar.steer import find_sites
        >>> lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense")
        >>> [(s.name, s.layer, s.kind) for s in find_sites(lm)]
        [('blocks.0.attn', 0, 'self'), ('blocks.1.attn', 1, 'self')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kinds = None if kind is None else ({kind} if isinstance(kind, str) else set(kind))
    if kinds is not None and not kinds <= set(KINDS):
        raise ValueError(f"kind must be among {KINDS}, got {sorted(kinds)}")
    classes = classes if classes is not None else _attention_classes()
    found: list[tuple[str, nn.Module, tuple[str, int | None, int | None]]] = []  # (name, module, what)
    for name, module in model.named_modules():
        what = _site_of(cast(nn.Module, module), classes)
        if what is not None and not any(name.startswith(outer + ".") or outer == "" for outer, _, _ in found):
            found.append((str(name), cast(nn.Module, module), what))
    sites = [Site(name, m, i, *what) for i, (name, m, what) in enumerate(found)]
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        wanted = {i % len(sites) if sites else i for i in wanted}
        sites = [s for s in sites if s.layer in wanted]
    if kinds is not None:
        sites = [s for s in sites if s.kind in kinds]
    if name_glob is not None:
        sites = [s for s in sites if fnmatch.fnmatchcase(s.name, name_glob)]
    return sites


#: what selects sites: None (every site), a name glob, a ``Site``, several, or a predicate
SiteSelector = None | str | Site | Iterable[Site] | Callable[[Site], bool]


def matches(selector: SiteSelector, site: Site) -> bool:
    """Whether ``selector`` selects ``site`` (see ``SiteSelector``)."""
    if selector is None:
        return True
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(site.name, selector)
    if isinstance(selector, Site):
        return selector.module is site.module
    if callable(selector):
        return bool(selector(site))
    return any(s.module is site.module for s in selector)


class TokenGroups:
    """Named groups of token positions of a sequence of ``n`` tokens (optionally a ``grid`` of ``h x w`` tokens
    after ``offset`` others, e.g. image patches after text tokens).

    Args:
        n: Sequence length.
        grid: ``(h, w)`` of the image tokens, for 2D maps (``to_grid``), or None.
        offset: Position of the first grid token (default 0).
        **groups: Name -> a ``slice``, a list/1D tensor of positions, or a bool mask ``(n,)`` or ``(B, n)``.

    Raises:
        ValueError: A position outside ``[0, n)``, a mask of another length, or a grid that does not fit.

    Examples:
        >>> from nearfar.steer import TokenGroups
        >>> g = TokenGroups(10, sinks=[0], image=slice(1, 7), text=slice(7, 10), grid=(2, 3), offset=1)
        >>> g.mask("image").int().tolist()
        [[0, 1, 1, 1, 1, 1, 1, 0, 0, 0]]
    """

    def __init__(self, n: int, grid: tuple[int, int] | None = None, offset: int = 0,
                 **groups: slice | list[int] | torch.Tensor) -> None:
        self.n, self.grid, self.offset = n, grid, offset
        if grid is not None and (offset < 0 or offset + grid[0] * grid[1] > n):
            raise ValueError(f"grid {grid} at offset {offset} does not fit in n={n} tokens")
        self._masks: dict[str, torch.Tensor] = {}
        for name, spec in groups.items():
            self._masks[name] = self._as_mask(name, spec)

    def _as_mask(self, name: str, spec: slice | list[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
            if spec.shape[-1] != self.n or spec.dim() not in (1, 2):
                raise ValueError(f"group {name!r}: a bool mask must be (n,) or (B, n) with n={self.n}, got "
                                 f"{tuple(spec.shape)}")
            return spec if spec.dim() == 2 else spec[None]
        idx = torch.arange(self.n)[spec] if isinstance(spec, slice) else torch.as_tensor(spec, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise ValueError(f"group {name!r}: positions must be in [0, {self.n}), got {idx.tolist()}")
        return torch.zeros(1, self.n, dtype=torch.bool).index_fill_(1, idx, True)

    @property
    def names(self) -> list[str]:
        return list(self._masks)

    def mask(self, name: str) -> torch.Tensor:
        """The group's bool mask ``(B or 1, n)``."""
        if name not in self._masks:
            raise KeyError(f"no token group {name!r}; groups: {self.names}")
        return self._masks[name]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The grid tokens of ``x (..., n)`` as ``(..., h, w)``."""
        if self.grid is None:
            raise ValueError("these TokenGroups have no grid")
        h, w = self.grid
        return x[..., self.offset:self.offset + h * w].unflatten(-1, (h, w))
