"""Checks every mechanism module must pass: reuse these instead of re-writing them per mechanism."""

from __future__ import annotations

import copy

import torch

import nearfar

# small settings of the 1D layers so that windows, blocks and segments are smaller than a test sequence of ~24
SMALL = {"streaming_llm": dict(window=6, sinks=2), "longformer": dict(window=6),
         "bigbird": dict(block=4, global_blocks=1, random_blocks=1), "s2_attention": dict(block=4, local_blocks=2,
                                                                                          vert_stride=2),
         "moa": dict(total_len=24, sink_size=2, minimum_cache_size=4, split_size=2), "cca": dict(group_size=4,
                                                                                             window_size=6),
         "titans_mac": dict(segment_len=8, num_persistent=2), "lightning": dict(block_size=8),
         "linear_attention": dict(block_size=8), "neighborhood": dict(kernel_size=5, ndim=1),
         "fit_ar": dict(group_size=4, latents_per_group=2), "kdgqa": dict(block_size=4, num_kv_heads=2),
         "dgqa": dict(num_kv_heads=2),
         "moh": dict(shared_heads=0, top_k=1),  # 2 heads: 1 of 2 routed heads per token, not every head on
         "seer_attention": dict(block_size=4, gate_dim=8, sparsity="token_budget", token_budget=8),
         "landmark": dict(block_size=3),
         "routing_transformer": dict(local_window=6, num_clusters=3, block_size=4),
         "moba": dict(chunk_size=4, topk=2),
         "nsa": dict(block_size=4, block_counts=3, window_size=4),
         "longheads": dict(chunk_size=2, num_chunks=4, begin_selective_length=8),  # chunks chosen from i = 8 on
         # one query per block, a search at every decoded token: decoding equals the forward; 2 of up to 11 blocks
         "hip": dict(mask_k=4, q_block=1, kv_block=2, window=3, sinks=1, refresh_interval=1)}
#: every (sequence layer, CAB pattern it claims) pair of the registry
SEQ_CASES = [(m, p) for m in nearfar.mechanisms() if m.kind == "layer" and "1d" in m.dims for p in m.patterns]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "output") -> None:
    """Max abs error within ``rtol`` of the expected tensor's max magnitude (at least 1)."""
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rtol * max(1.0, expected.double().abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def check_against_reference(module: torch.nn.Module, x: torch.Tensor, reference, rtol: float = 1e-5,
                            grad_rtol: float = 3e-5) -> None:
    """``module(x)`` in float32 vs ``reference(module64, x64)`` in float64: outputs, input and parameter grads."""
    x = x.detach().float().requires_grad_()
    out = module(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    m64 = copy.deepcopy(module).double()
    m64.zero_grad()
    x64 = x.detach().double().requires_grad_()
    expected = reference(m64, x64)
    (expected * g.double()).sum().backward()
    assert_close(out, expected, rtol)
    assert_close(x.grad, x64.grad, grad_rtol, "x.grad")
    for (name, p), p64 in zip(module.named_parameters(), m64.parameters()):
        if p.grad is None:
            assert p64.grad is None or not p64.grad.any(), f"{name}: no gradient but the reference has one"
            continue
        assert_close(p.grad, p64.grad, grad_rtol, f"{name}.grad")
    module.zero_grad()


def check_forward_backward_finite(module: torch.nn.Module, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    out = module(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all(), "output has NaN/inf"
    assert torch.isfinite(x.grad).all(), "input gradient has NaN/inf"
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{name}.grad has NaN/inf"
    module.zero_grad()


def check_compile_matches_eager(module: torch.nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    module.eval()
    with torch.no_grad():
        eager = module(x)
        compiled = torch.compile(module)(x)
    assert_close(compiled, eager, atol, "compiled output")


def check_state_dict_round_trip(make, x: torch.Tensor) -> None:
    """A fresh module loading another's state_dict (strict) computes the same function."""
    torch.manual_seed(0)
    a = make().eval()
    torch.manual_seed(1)
    b = make().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def check_outputs_and_grads(out: torch.Tensor, expected: torch.Tensor, inputs, rtol: float = 1e-5,
                            grad_rtol: float = 3e-5) -> None:
    """A fast path's ``out`` against a float64 reference ``expected`` computed from the same leaf ``inputs``:
    values, and the gradients of a random projection of both with respect to every input."""
    assert_close(out, expected, rtol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * g.double()).sum(), inputs)
    for i, (a, b) in enumerate(zip(grads, expected_grads)):
        assert_close(a, b, grad_rtol, f"grad of input {i}")


def check_loss_halves(model: torch.nn.Module, data: torch.Tensor, steps: int = 20, lr: float = 1e-2) -> None:
    """``steps`` Adam steps on ``model.loss(data)``: finite losses and gradients, and the last loss below half
    the first (the model can fit a small learnable dataset)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(data)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


class Split(torch.nn.Module):
    """A cross layer on one tensor: the first ``nq`` rows are the queries, the rest the context (so reference checks
    also compare the context's gradient)."""

    def __init__(self, layer: torch.nn.Module, nq: int):
        super().__init__()
        self.layer, self.nq = layer, nq

    def forward(self, xc: torch.Tensor) -> torch.Tensor:
        return self.layer(xc[:, :self.nq], context=xc[:, self.nq:])
