"""The probe of the steering tests: one attention call with a fixed pattern, engine and inputs, and its float64
probabilities, so that every edit can be checked against the edit applied to the materialised ``P``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nearfar as nf
from nearfar.steer import Site, control

GRID = (6, 6)
N = GRID[0] * GRID[1]
CASES = {  # name: (pattern, engine, takes a relative-position table)
    "dense-causal": (nf.Causal(), "dense", False),
    "blocksparse-window": (nf.SlidingWindow(left=7) & nf.Causal(), "blocksparse", False),
    "blocksparse-na-rpb": (nf.Neighborhood(3, grid=GRID), "blocksparse", True),
    "partition-blocks-rpb": (nf.Blocks(3, grid=GRID), "partition", True),
}


class Probe(nn.Module):
    """One attention call with a fixed pattern, engine and inputs: the site the edits act on."""

    def __init__(self, case: str, hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
        super().__init__()
        self.pattern, self.engine, takes = CASES[case]
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(2, hq, N, d, generator=g)
        self.k, self.v = torch.randn(2, hkv, N, d, generator=g), torch.randn(2, hkv, N, d, generator=g)
        self.rpb = torch.randn(*self.pattern.rpb_shape(hq), generator=g) if takes else None
        self.kpm = torch.rand(2, N, generator=g) > 0.15

    def forward(self) -> torch.Tensor:
        return nf.attend(self.q, self.k, self.v, self.pattern, rpb=self.rpb, key_padding_mask=self.kpm,
                         engine=self.engine)

    def scores(self, extra_bias: torch.Tensor | None = None, q: torch.Tensor | None = None,
               k: torch.Tensor | None = None) -> torch.Tensor:
        """The float64 scores ``(B, Hq, N, Nk)`` as the engine forms them, ``-inf`` where masked."""
        q = (self.q if q is None else q).double()
        k = (self.k if k is None else k).double()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if self.rpb is not None:
            s = s + nf.bias.RelativePositionBias(self.rpb.double(), self.pattern, N).tile(
                torch.arange(N)[None], torch.arange(N)[None, None])[:, :, 0]
        if extra_bias is not None:
            s = s + extra_bias.double()
        allowed = self.kpm[:, None, None, :]
        if self.pattern is not None:
            allowed = self.pattern.mask(N, k.shape[2])[None, None] & allowed
        return s.masked_fill(~allowed, float("-inf"))

    def probabilities(self, extra_bias: torch.Tensor | None = None, q: torch.Tensor | None = None,
                      k: torch.Tensor | None = None) -> torch.Tensor:
        """The float64 probabilities ``(B, Hq, N, Nk)`` (fully masked rows 0), optionally with a bias."""
        return torch.nan_to_num(torch.softmax(self.scores(extra_bias, q, k), -1), nan=0.0)

    def out(self, p: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        v = (self.v if v is None else v).double()
        return p @ v.repeat_interleave(p.shape[1] // v.shape[1], 1)


def run_with(probe: Probe, edits) -> torch.Tensor:
    with control(probe, edits, sites=[Site("probe", probe, 0, "self")]):
        return probe()


def keys_mask(idx):
    return torch.zeros(N, dtype=torch.bool).index_fill_(0, torch.tensor(idx), True)


class LargestStorage(TorchDispatchMode):
    """The largest storage any op returns (bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def assert_grads_match(probe: Probe, edits, reference, seed: int = 0) -> None:
    """The gradients of q, k and v through ``run_with(probe, edits)`` equal those of ``reference(q, k, v)``, the
    edited output computed in float64 from the materialised probabilities (one random cotangent)."""
    cot = torch.randn(probe.q.shape[0], probe.q.shape[1], N, probe.v.shape[-1],
                      generator=torch.Generator().manual_seed(seed))
    base = (probe.q, probe.k, probe.v)
    grads = []
    for ref in (False, True):
        q, k, v = (x.detach().clone().double() if ref else x.detach().clone() for x in base)
        for x in (q, k, v):
            x.requires_grad_(True)
        if ref:
            out = reference(q, k, v)
        else:
            probe.q, probe.k, probe.v = q, k, v
            out = run_with(probe, edits)
        out.backward(cot.to(out.dtype))
        grads.append([x.grad.double() for x in (q, k, v)])
    probe.q, probe.k, probe.v = base
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
