"""Branch-level decoding: run several inputs (branches) of one model together, and combine their next-token
logits.

Training-free hallucination mitigation for vision-language models decodes from two branches of one prompt: the
original image and a distorted one (contrastive), or the original and an augmented one (additive), at every
step. ``run_branches`` runs the branches as one batch when their shapes allow (so edits under ``control`` see one
call per site and step) and ``combine_logits`` mixes the two logits with the adaptive plausibility constraint:

- ``"contrastive"``: Leng, Zhang, Chen, Li, Lu, Miao and Bing, "Mitigating Object Hallucinations in Large
  Vision-Language Models through Visual Contrastive Decoding", CVPR 2024, arXiv:2311.16922 (VCD; official code:
  DAMO-NLP-SG/VCD, ``vcd_utils/vcd_sample.py``, ``sample``): ``(1 + alpha) * main - alpha * aux``;
- ``"additive"``: An, Tian, Leng, Nie, Lin, Wang, Dai, Chen and Lu, "AGLA: Mitigating Object Hallucinations in
  Large Vision-Language Models with Assembly of Global and Local Attention", arXiv:2406.12718, 2024 (official code:
  Lackel/AGLA, ``eval/sample.py``, ``sample``): ``main + alpha * aux``.

The plausibility cut follows both official samplers: it keeps the tokens whose *raw* ``main`` logit is at least
``log(beta) + max(main)`` (before any temperature, top-k or other processing), which is the same set as
``softmax(main) >= beta * max softmax(main)``, computed in the log domain so that no probability underflows. What
differs from the official code: the defaults (VCD uses ``alpha=0.5``, ``beta=0.1``; AGLA ``alpha=1``,
``beta=0.5``; here ``alpha=1.0``, ``beta=0.1`` for both), the logits processors and sampling, which stay the
caller's, and the errors for bad arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..checks import check_choice, check_real_range

COMBINE_MODES = ("contrastive", "additive")


def _split(out: Any, sizes: list[int], where: str) -> list[Any]:
    """``out`` (a tensor, or tuples/lists/dicts of them, batch first) split into ``len(sizes)`` parts."""
    total = sum(sizes)
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != total:
            raise ValueError(f"run_branches: the forward's {where} has shape {tuple(out.shape)}, not a batch of "
                             f"{total} first; return the batch first, or pass a forward that does")
        return list(out.split(sizes))
    if out is None:
        return [None] * len(sizes)
    if isinstance(out, (tuple, list)):
        parts = [_split(o, sizes, f"{where}[{i}]") for i, o in enumerate(out)]
        rebuilt = [[p[j] for p in parts] for j in range(len(sizes))]
        if hasattr(out, "_fields"):  # a named tuple
            return [type(out)(*r) for r in rebuilt]
        return [type(out)(r) for r in rebuilt]
    if isinstance(out, Mapping):
        split = {key: _split(v, sizes, f"{where}[{key!r}]") for key, v in out.items()}
        return [{key: s[j] for key, s in split.items()} for j in range(len(sizes))]
    raise TypeError(f"run_branches: cannot split the forward's {where} of type {type(out).__name__} by batch; "
                    "return tensors (or tuples, lists or dicts of them) with the batch first")


def run_branches(model: nn.Module, inputs: Mapping[str, torch.Tensor],
                 forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Run the branches ``inputs`` through ``model``: as one batch when they agree beyond the batch dimension
    (shape, dtype and device), the output split back per branch; otherwise one forward per branch.

    The model must treat batch items independently (no batch statistics, as in evaluation); batched and separate
    runs then agree up to floating-point rounding. Under ``control``, a batched run is one step (one model call)
    and separate runs are one step each.

    Args:
        model: The model.
        inputs: Branch name -> input tensor, batch first (at least one branch).
        forward: ``forward(model, x) -> output``; None: ``model(x)``. Its output must have the batch first: a
            tensor, or tuples, lists or dicts of tensors (None leaves are kept).

    Returns:
        Branch name -> its output, in the order of ``inputs``.

    Raises:
        TypeError: ``inputs`` not a mapping of tensors; an output that cannot be split by batch.
        ValueError: No branches, a 0-dim or empty input, or an output whose first dimension is not the batch.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import run_branches
        >>> lm = nf.TinyLM(64, dim=32, depth=1, num_heads=2, mechanism="dense").eval()
        >>> out = run_branches(lm, {"image": torch.randint(0, 64, (1, 6)), "noised": torch.randint(0, 64, (1, 6))})
        >>> {name: tuple(o.shape) for name, o in out.items()}
        {'image': (1, 6, 64), 'noised': (1, 6, 64)}
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict of branch name -> tensor, got {type(inputs).__name__}")
    if not inputs:
        raise ValueError("inputs must hold at least one branch")
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{name!r}] must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"inputs[{name!r}] must have a non-empty batch first, got shape {tuple(x.shape)}")
    fwd = forward if forward is not None else (lambda m, x: m(x))
    xs = list(inputs.values())
    if len(xs) > 1 and len({(tuple(x.shape[1:]), x.dtype, x.device) for x in xs}) == 1:
        parts = _split(fwd(model, torch.cat(xs)), [x.shape[0] for x in xs], "output")
        return dict(zip(inputs, parts, strict=True))
    return {name: fwd(model, x) for name, x in inputs.items()}


def combine_logits(main: torch.Tensor, aux: torch.Tensor, alpha: float = 1.0, plausibility_beta: float | None = 0.1,
                   mode: str = "contrastive") -> torch.Tensor:
    """Combine two branches' logits, then keep only the tokens plausible under ``main``.

    ``"contrastive"`` (VCD): ``(1 + alpha) * main - alpha * aux``; ``"additive"`` (AGLA): ``main + alpha * aux``.
    Adaptive plausibility: a token whose probability under ``softmax(main)`` (the raw logits) is below
    ``plausibility_beta`` times the largest one gets ``-inf``; the test is ``main < log(beta) + max(main)``.

    Args:
        main: Logits of the main branch ``(..., V)``.
        aux: Logits of the other branch, the same shape.
        alpha: Weight of ``aux``, ``>= 0``.
        plausibility_beta: In ``[0, 1]``; 0 or None keeps every token, 1 only the ones tied with the most likely.
        mode: ``"contrastive"`` or ``"additive"``.

    Returns:
        The combined logits, ``(..., V)``, in the promoted dtype of ``main`` and ``aux``.

    Raises:
        TypeError: ``main``/``aux`` not floating tensors; a non-number ``alpha`` or ``plausibility_beta``.
        ValueError: Shapes that differ or a 0-dim input; ``alpha < 0`` or not finite; ``plausibility_beta``
            outside ``[0, 1]``; an unknown ``mode``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import combine_logits
        >>> main, aux = torch.tensor([[2.0, 1.0, -3.0]]), torch.tensor([[0.0, 2.0, 0.0]])
        >>> combine_logits(main, aux, alpha=1.0, plausibility_beta=0.1)  # token 2: p/p_max = e^-5 < 0.1
        tensor([[4., 0., -inf]])
    """
    for name, x in (("main", main), ("aux", aux)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor of logits, got {type(x).__name__} "
                            f"{getattr(x, 'dtype', '')}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have a vocabulary dimension last, got a 0-dim tensor")
    if main.shape != aux.shape:
        raise ValueError(f"main and aux must have one shape, got {tuple(main.shape)} and {tuple(aux.shape)}")
    a = check_real_range(alpha, "alpha", 0.0, math.inf, open_high=True)
    beta = 0.0 if plausibility_beta is None else check_real_range(plausibility_beta, "plausibility_beta", 0.0, 1.0)
    check_choice(mode, "mode", COMBINE_MODES)
    dt = torch.promote_types(main.dtype, aux.dtype)
    main, aux = main.to(dt), aux.to(dt)
    combined = (1 + a) * main - a * aux if mode == "contrastive" else main + a * aux
    if beta <= 0.0:
        return combined
    cutoff = math.log(beta) + main.amax(-1, keepdim=True)
    return combined.masked_fill(main < cutoff, float("-inf"))

