"""Agent attention computed the way the official ``agent_pvt.py`` ``AgentAttention.forward`` does it.

Tokens ``(B, N, C)``, explicit ``softmax(q kᵀ · scale + bias)`` matmuls for both stages, position biases repeated
over the batch, DWC on channels-first ``v``; the module's own weights. (The per-axis bias resize for maps other
than the construction size is not in the official code; the module's ``resize_axis`` is reused for it.)

``python tests/oracles/agent.py`` runs the linear-scaling check (no ``N x N`` tensor, as in
``tests/layers/test_agent.py``): forward time and the largest intermediate tensor at growing N with fixed ``agent_num``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from nearfar.layers.agent import AgentAttention, resize_axis


def agent_official(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    b, hgt, wid, c = x.shape
    n, h, na, r = hgt * wid, m.num_heads, m.agent_num, m.sr_ratio
    d = c // h
    x = x.reshape(b, n, c)
    q = m.q(x)
    if r > 1:
        x_ = m.norm(m.sr(x.permute(0, 2, 1).reshape(b, c, hgt, wid)).reshape(b, c, -1).permute(0, 2, 1))
        kv = m.kv(x_).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    else:
        kv = m.kv(x).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    k, v = kv[0], kv[1]
    hk, wk = hgt // r, wid // r
    agent = F.adaptive_avg_pool2d(q.reshape(b, hgt, wid, c).permute(0, 3, 1, 2), m.pool_size)
    agent = agent.reshape(b, c, -1).permute(0, 2, 1).reshape(b, na, h, d).permute(0, 2, 1, 3)
    q = q.reshape(b, n, h, d).permute(0, 2, 1, 3)
    k = k.reshape(b, -1, h, d).permute(0, 2, 1, 3)
    v = v.reshape(b, -1, h, d).permute(0, 2, 1, 3)

    pb1 = F.interpolate(m.an_bias, size=(hk, wk), mode="bilinear").reshape(1, h, na, -1).repeat(b, 1, 1, 1)
    pb2 = (resize_axis(m.ah_bias, 3, hk) + resize_axis(m.aw_bias, 4, wk)).reshape(1, h, na, -1).repeat(b, 1, 1, 1)
    agent_attn = ((agent * m.scale) @ k.transpose(-2, -1) + pb1 + pb2).softmax(dim=-1)
    agent_v = agent_attn @ v

    ab1 = F.interpolate(m.na_bias, size=(hgt, wid), mode="bilinear").reshape(1, h, na, -1).permute(0, 1, 3, 2)
    ab2 = (resize_axis(m.ha_bias, 2, hgt) + resize_axis(m.wa_bias, 3, wid)).reshape(1, h, -1, na)
    q_attn = ((q * m.scale) @ agent.transpose(-2, -1) + ab1.repeat(b, 1, 1, 1) + ab2.repeat(b, 1, 1, 1)).softmax(-1)
    out = (q_attn @ agent_v).transpose(1, 2).reshape(b, n, c)

    v = v.transpose(1, 2).reshape(b, hk, wk, c).permute(0, 3, 1, 2)
    if r > 1:
        v = F.interpolate(v, size=(hgt, wid), mode="bilinear")
    out = out + m.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c)
    return m.proj(out).reshape(b, hgt, wid, c)


BASELINES = {"agent": agent_official}


def largest_intermediate(fn, *args) -> int:
    """The largest number of elements of any tensor an op produces while ``fn(*args)`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    _Largest.largest = max(_Largest.largest, t.numel())
            return out

    with _Largest():
        fn(*args)
    return _Largest.largest


def scaling_check(sides=(28, 56, 112), dim: int = 64, num_heads: int = 2, rounds: int = 5) -> list[tuple]:
    """Oracle 3: at fixed agent_num the forward time and the largest intermediate grow ~linearly in N."""
    rows = []
    for side in sides:
        m = AgentAttention(dim, num_heads, num_patches=side * side).eval()
        x = torch.randn(1, side, side, dim)
        with torch.no_grad():
            m(x)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                m(x)
                times.append(time.perf_counter() - t0)
            rows.append((side * side, sorted(times)[rounds // 2], largest_intermediate(m, x)))
    return rows


if __name__ == "__main__":
    rows = scaling_check()
    n0, t0, l0 = rows[0]
    print("N        time(ms)  time/N ratio  largest tensor  largest/N ratio")
    for n, t, big in rows:
        print(f"{n:<8} {t * 1e3:8.2f}  {(t / n) / (t0 / n0):12.2f}  {big:14d}  {(big / n) / (l0 / n0):15.2f}")
