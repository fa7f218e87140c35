"""Argument checks shared by every pattern, layer, model and the bench: one function per kind of argument.

Each check raises before any work, naming the parameter and the allowed range, and follows one rule:
a value of the wrong type (a bool where a number is expected included) raises ``TypeError``; a value of the right
type outside the allowed range raises ``ValueError``. Each returns the value (normalised where said) so that a
constructor can write ``self.size = check_positive_int(size, "size")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import TypeGuard, TypeVar, overload

import torch

T = TypeVar("T")

__all__ = [
    "check_bool",
    "check_channels_last",
    "check_choice",
    "check_dim_heads",
    "check_grid",
    "check_int_range",
    "check_nonneg_int",
    "check_pair",
    "check_per_axis",
    "check_positive_float",
    "check_positive_int",
    "check_real_range",
    "check_same_dtype_device",
    "check_scale",
    "check_tensor",
]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(value: object, name: str, low: int, what: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {what} (>= {low}), got {value}")
    return value


def _is_real(value: object) -> TypeGuard[float]:  # any Real but a bool (an int or a float for the checker)
    return isinstance(value, Real) and not isinstance(value, bool)


def check_positive_int(value: object, name: str) -> int:
    """Check that ``value`` is an int >= 1.

    Args:
        value: the argument.
        name: the parameter's name, used in the message.

    Returns:
        ``value``.

    Raises:
        TypeError: ``value`` is not an int, or is a bool.
        ValueError: ``value`` < 1.

    Examples:
        >>> from nearfar.checks import check_positive_int
        >>> check_positive_int(3, "window")
        3
        >>> check_positive_int(0, "window")
        Traceback (most recent call last):
            ...
        ValueError: window must be a positive int (>= 1), got 0
    """
    return _int_at_least(value, name, 1, "a positive int")


def check_nonneg_int(value: object, name: str) -> int:
    """Check that ``value`` is an int >= 0.

    Args:
        value: the argument.
        name: the parameter's name, used in the message.

    Returns:
        ``value``.

    Raises:
        TypeError: ``value`` is not an int, or is a bool.
        ValueError: ``value`` < 0.

    Examples:
        >>> from nearfar.checks import check_nonneg_int
        >>> check_nonneg_int(0, "shift")
        0
        >>> check_nonneg_int(True, "shift")
        Traceback (most recent call last):
            ...
        TypeError: shift must be a non-negative int, got True
    """
    return _int_at_least(value, name, 0, "a non-negative int")


def check_int_range(value: object, name: str, low: int, high: int) -> int:
    """Check that ``value`` is an int in the closed range ``[low, high]``.

    Args:
        value: the argument.
        name: the parameter's name, used in the message.
        low: the smallest allowed value.
        high: the largest allowed value.

    Returns:
        ``value``.

    Raises:
        TypeError: ``value`` is not an int, or is a bool.
        ValueError: ``value`` is outside ``[low, high]``.

    Examples:
        >>> from nearfar.checks import check_int_range
        >>> check_int_range(2, "layer_idx", 0, 11)
        2
        >>> check_int_range(12, "layer_idx", 0, 11)
        Traceback (most recent call last):
            ...
        ValueError: layer_idx must be in [0, 11], got 12
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Check that ``value`` is a bool (not an int standing for one).

    Args:
        value: the argument.
        name: the parameter's name, used in the message.

    Returns:
        ``value``.

    Raises:
        TypeError: ``value`` is not a bool.

    Examples:
        >>> from nearfar.checks import check_bool
        >>> check_bool(False, "causal")
        False
        >>> check_bool(1, "causal")
        Traceback (most recent call last):
            ...
        TypeError: causal must be a bool, got 1
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_positive_float(value: object, name: str) -> float:
    """Check that ``value`` is a positive finite real number (an int is accepted, a bool is not).

    Args:
        value: the argument.
        name: the parameter's name, used in the message.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number, or is a bool.
        ValueError: ``value`` is not in ``(0, inf)`` (nan included).

    Examples:
        >>> from nearfar.checks import check_positive_float
        >>> check_positive_float(4, "mlp_ratio")
        4.0
    """
    if not _is_real(value):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number (0 < {name} < inf), got {value!r}")
    return float(value)


def check_real_range(value: object, name: str, low: float, high: float, *, open_low: bool = False,
                     open_high: bool = False) -> float:
    """Check that ``value`` is a real number in a range, closed unless ``open_low``/``open_high`` says otherwise.

    Args:
        value: the argument.
        name: the parameter's name, used in the message.
        low: the lower bound.
        high: the upper bound (``math.inf`` for none).
        open_low: exclude ``low``.
        open_high: exclude ``high``.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number, or is a bool.
        ValueError: ``value`` is outside the range (nan included).

    Examples:
        >>> from nearfar.checks import check_real_range
        >>> check_real_range(0.5, "alpha", 0, 1)
        0.5
        >>> check_real_range(0, "max_lr", 0, float("inf"), open_low=True)
        Traceback (most recent call last):
            ...
        ValueError: max_lr must be a number in (0, inf], got 0
    """
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if not _is_real(value):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if not (above and below):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_scale(value: object, name: str = "qk_scale") -> float | None:
    """Check an attention scale: None (the layer's default, usually ``head_dim ** -0.5``) or a positive finite number.

    Args:
        value: the argument.
        name: the parameter's name, used in the message.

    Returns:
        None, or ``float(value)``.

    Raises:
        TypeError: ``value`` is neither None nor a real number, or is a bool.
        ValueError: ``value`` is not in ``(0, inf)`` (nan included).

    Examples:
        >>> from nearfar.checks import check_scale
        >>> check_scale(None) is None, check_scale(0.125)
        (True, 0.125)
    """
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(f"{name} must be None or a positive finite number, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be None or a positive finite number (0 < {name} < inf), got {value!r}")
    return float(value)


@overload
def check_per_axis(value: object, ndim: int, name: str) -> tuple[int, ...]: ...


@overload
def check_per_axis(value: object, ndim: int, name: str, check: Callable[[object, str], T]) -> tuple[T, ...]: ...


def check_per_axis(value: object, ndim: int, name: str,
                   check: Callable[[object, str], object] = check_positive_int) -> tuple[object, ...]:
    """Broadcast one value to ``ndim`` axes, or check a per-axis tuple/list; every entry goes through ``check``.

    Args:
        value: one value, or a tuple/list of ``ndim`` values.
        ndim: the number of axes.
        name: the parameter's name; entries are named ``name[i]``.
        check: the check of one entry (``check_positive_int`` by default).

    Returns:
        A tuple of ``ndim`` checked values.

    Raises:
        ValueError: a tuple/list of another length than ``ndim``; or what ``check`` raises.
        TypeError: what ``check`` raises.

    Examples:
        >>> from nearfar.checks import check_per_axis, check_nonneg_int
        >>> check_per_axis(7, 2, "window_size")
        (7, 7)
        >>> check_per_axis((0, 3), 2, "shift_size", check=check_nonneg_int)
        (0, 3)
    """
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{name} has {len(value)} entries but the pattern is {ndim}D; "
                             f"give an int or {ndim} values")
        return tuple(check(v, f"{name}[{i}]") for i, v in enumerate(value))
    return (check(value, name),) * ndim


def check_pair(value: object, name: str, check: Callable[[object, str], int] = check_positive_int) -> tuple[int, int]:
    """``check_per_axis`` for two axes (a 2D size such as a kernel or a window), typed as a pair.

    Args:
        value: one int, or a tuple/list of two.
        name: the parameter's name; entries are named ``name[i]``.
        check: the check of one entry (``check_positive_int`` by default).

    Returns:
        ``(a, b)``.

    Raises:
        ValueError: a tuple/list of another length than 2; or what ``check`` raises.
        TypeError: what ``check`` raises.

    Examples:
        >>> check_pair(7, "window_size")
        (7, 7)
    """
    a, b = check_per_axis(value, 2, name, check)
    return a, b


def check_grid(grid: object, name: str = "grid") -> tuple[int, ...] | None:
    """Check a spatial shape: None, an int (1D) or a tuple/list of 1 to 3 positive ints.

    Args:
        grid: the argument.
        name: the parameter's name, used in the message.

    Returns:
        None, or the shape as a tuple.

    Raises:
        ValueError: not an int or a tuple/list of 1 to 3 entries, or an entry < 1.
        TypeError: an entry is not an int.

    Examples:
        >>> from nearfar.checks import check_grid
        >>> check_grid(16), check_grid([14, 14])
        ((16,), (14, 14))
    """
    if grid is None:
        return None
    if _is_int(grid):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
        raise ValueError(f"{name} must be a tuple of 1 to 3 positive ints (the spatial shape), got {grid!r}")
    return tuple(check_positive_int(g, f"{name}[{i}]") for i, g in enumerate(grid))


def check_dim_heads(dim: object, num_heads: object) -> int:
    """Check that ``dim`` is a positive multiple of ``num_heads`` (both positive ints).

    Args:
        dim: the model width.
        num_heads: the number of heads.

    Returns:
        The head dim ``dim // num_heads``.

    Raises:
        ValueError: either is not a positive int, or ``dim % num_heads != 0``.

    Examples:
        >>> from nearfar.checks import check_dim_heads
        >>> check_dim_heads(96, 3)
        32
    """
    if (not _is_int(dim) or not _is_int(num_heads) or num_heads <= 0 or dim <= 0 or dim % num_heads):
        raise ValueError(f"dim ({dim!r}) must be a positive multiple of num_heads ({num_heads!r})")
    return dim // num_heads


def check_channels_last(x: object, ndim: int, dim: int, name: str = "x") -> tuple[int, tuple[int, ...], int]:
    """Check that ``x`` is a non-empty channel-last tensor ``(B, *spatial, dim)`` with ``ndim`` spatial axes.

    Args:
        x: the input.
        ndim: the number of spatial axes.
        dim: the channel count.
        name: the parameter's name, used in the message.

    Returns:
        ``(B, spatial, N)`` with ``N`` the number of spatial positions.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: another rank or channel count, or an empty axis.

    Examples:
        >>> import torch
        >>> from nearfar.checks import check_channels_last
        >>> check_channels_last(torch.zeros(2, 4, 5, 8), 2, 8)
        (2, (4, 5), 20)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim + 2 or x.shape[-1] != dim:
        axes = ", ".join(("T", "H", "W")[3 - ndim:] if ndim <= 3 else (f"S{i}" for i in range(ndim)))
        raise ValueError(f"{name} must be (B, {axes}, {dim}) channel-last, got {tuple(x.shape)}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[1:-1])
    return x.shape[0], spatial, math.prod(spatial)


def check_same_dtype_device(**tensors: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """Check that the named tensors share one dtype and one device.

    Args:
        **tensors: the tensors by parameter name, e.g. ``check_same_dtype_device(q=q, k=k, v=v)``.

    Returns:
        The shared ``(dtype, device)``.

    Raises:
        TypeError: the dtypes differ.
        ValueError: the devices differ.

    Examples:
        >>> import torch
        >>> from nearfar.checks import check_same_dtype_device
        >>> check_same_dtype_device(q=torch.zeros(1), k=torch.zeros(1))
        (torch.float32, device(type='cpu'))
    """
    names = ", ".join(tensors)
    ts = list(tensors.values())
    if any(t.dtype != ts[0].dtype for t in ts):
        raise TypeError(f"{names} must share one dtype, got " + ", ".join(str(t.dtype) for t in ts))
    if any(t.device != ts[0].device for t in ts):
        raise ValueError(f"{names} must be on one device, got " + ", ".join(str(t.device) for t in ts))
    return ts[0].dtype, ts[0].device


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the strings ``choices``.

    Args:
        value: the argument.
        name: the parameter's name, used in the message.
        choices: the allowed strings.

    Returns:
        ``value``.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: ``value`` is not one of ``choices``.

    Examples:
        >>> from nearfar.checks import check_choice
        >>> check_choice("max", "how", ("mean", "max"))
        'max'
        >>> check_choice("sum", "how", ("mean", "max"))
        Traceback (most recent call last):
            ...
        ValueError: how must be one of 'mean', 'max', got 'sum'
    """
    allowed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {allowed}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_tensor(value: object, name: str, ndim: int, *, floating: bool = True) -> torch.Tensor:
    """Check that ``value`` is a tensor of rank ``ndim`` (of a floating dtype when ``floating``).

    Args:
        value: the argument.
        name: the parameter's name, used in the message.
        ndim: the required number of dimensions.
        floating: also require a floating dtype.

    Returns:
        ``value``.

    Raises:
        TypeError: ``value`` is not a tensor, or (``floating``) not of a floating dtype.
        ValueError: ``value`` has another number of dimensions.

    Examples:
        >>> import torch
        >>> from nearfar.checks import check_tensor
        >>> check_tensor(torch.zeros(2, 3), "x", 2).shape
        torch.Size([2, 3])
        >>> check_tensor(torch.zeros(2, 3), "x", 4)
        Traceback (most recent call last):
            ...
        ValueError: x must have 4 dimensions, got shape (2, 3)
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_tokens(x: object, dim: int, name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a sequence batch ``(B, N, dim)`` with at least one token (the 1D layers' input).

    Args:
        x: the argument.
        dim: the required channel count.
        name: the parameter's name, used in the message.

    Returns:
        ``x``.

    Raises:
        ValueError: ``x`` is not a tensor ``(B, N >= 1, dim)``.

    Examples:
        >>> import torch
        >>> from nearfar.checks import check_tokens
        >>> check_tokens(torch.zeros(2, 0, 8), 8)
        Traceback (most recent call last):
            ...
        ValueError: x must be (B, N, 8) with N >= 1, got (2, 0, 8)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim or x.shape[1] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be (B, N, {dim}) with N >= 1, got {got}")
    return x
