"""Every message nearfar.distributed sends goes through here: counted, and failures turned into clear errors.

``count_bytes()`` records, per rank, the bytes and messages of each operation (``"halo"``, ``"bcast"``, ``"ring"``,
...) and pass (``"fwd"``, ``"bwd"``): point-to-point sizes as sent; a broadcast counts ``size`` received on every
other rank and ``size * (world - 1)`` sent by its source; a reduce the reverse. A failed call (a peer that raised and
left, a timeout of the process group) raises ``DistributedAttentionError`` naming the operation, the pass, the peers
and the rank, with the backend's message attached.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class DistributedAttentionError(RuntimeError):
    """A collective or point-to-point call of nearfar.distributed failed (a peer failed, or the group's timeout
    passed); the message names the operation, the pass, this rank and its peers."""


@dataclass
class CommStats:
    """Bytes and messages of one rank, keyed by ``"op.pass"`` (e.g. ``"halo.fwd"``), and the seconds this rank
    spent blocked on each (``waited``: in a collective, or waiting for posted point-to-point messages)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    waited: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def total(self, what: str = "sent", prefix: str = "") -> int:
        """Sum of ``sent`` or ``recv`` over the keys starting with ``prefix``."""
        d = self.sent if what == "sent" else self.recv
        return sum(v for k, v in d.items() if k.startswith(prefix))


_ACTIVE: list[CommStats] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[CommStats]:
    """Count this rank's traffic inside the ``with`` block (nested counters all count).

    Yields:
        The ``CommStats`` filled in as messages go.
    """
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def _record(what: str, sent: int, recv: int, messages: int, waited: float = 0.0) -> None:
    for s in _ACTIVE:
        s.sent[what] += sent
        s.recv[what] += recv
        s.messages[what] += messages
        s.waited[what] += waited


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _fail(what: str, peers: object, group: dist.ProcessGroup | None, err: Exception) -> DistributedAttentionError:
    me = dist.get_rank(group) if dist.is_initialized() else -1
    return DistributedAttentionError(
        f"nearfar.distributed: {what} failed on rank {me} (peers {peers}): {type(err).__name__}: {err}. A peer "
        "raised or left, or the process group's timeout passed; every rank must make the same calls (forward and "
        "backward) in the same order")


def p2p(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
        group: dist.ProcessGroup | None, what: str) -> None:
    """Post every receive, then every send (group ranks; contiguous buffers), and wait for all. Two buffers between
    the same pair in one call get distinct tags, in list order on both sides."""
    p2p_start(sends, recvs, group, what)()


def p2p_start(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
              group: dist.ProcessGroup | None, what: str) -> Callable[[], None]:
    """``p2p`` without the wait: posts the messages and returns the function that waits for them (so compute can
    run meanwhile)."""
    ops = []
    tags: dict[tuple[str, int], int] = defaultdict(int)
    for kind, items in (("recv", recvs), ("send", sends)):
        for peer, t in items:
            tag = tags[(kind, peer)]
            tags[(kind, peer)] += 1
            fn = dist.irecv if kind == "recv" else dist.isend
            ops.append(dist.P2POp(fn, t, _global(group, peer), group, tag))
    if not ops:
        return lambda: None
    peers = sorted({p for p, _ in sends + recvs})
    try:
        works = dist.batch_isend_irecv(ops)
    except RuntimeError as err:
        raise _fail(what, peers, group, err) from err

    def wait() -> None:
        t0 = time.perf_counter()
        try:
            for w in works:
                w.wait()
        except RuntimeError as err:
            raise _fail(what, peers, group, err) from err
        _record(what, sum(_nbytes(t) for _, t in sends), sum(_nbytes(t) for _, t in recvs), len(sends),
                time.perf_counter() - t0)

    return wait


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup | None, what: str) -> None:
    """``dist.broadcast`` from group rank ``src`` (in place)."""
    t0 = time.perf_counter()
    try:
        dist.broadcast(t, _global(group, src), group=group)
    except RuntimeError as err:
        raise _fail(what, f"source {src}", group, err) from err
    world, me = dist.get_world_size(group), dist.get_rank(group)
    _record(what, _nbytes(t) * (world - 1) if me == src else 0, 0 if me == src else _nbytes(t), int(me == src),
            time.perf_counter() - t0)


def reduce(t: torch.Tensor, dst: int, group: dist.ProcessGroup | None, what: str) -> None:
    """``dist.reduce`` (sum) onto group rank ``dst`` (in place)."""
    t0 = time.perf_counter()
    try:
        dist.reduce(t, _global(group, dst), op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        raise _fail(what, f"destination {dst}", group, err) from err
    world, me = dist.get_world_size(group), dist.get_rank(group)
    _record(what, 0 if me == dst else _nbytes(t), _nbytes(t) * (world - 1) if me == dst else 0, int(me != dst),
            time.perf_counter() - t0)


def all_gather(bufs: list[torch.Tensor], t: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """``dist.all_gather`` of equal-sized contiguous buffers; counts ``size`` sent to and received from each peer."""
    t0 = time.perf_counter()
    try:
        dist.all_gather(bufs, t, group=group)
    except RuntimeError as err:
        raise _fail(what, "all", group, err) from err
    peers = dist.get_world_size(group) - 1
    _record(what, _nbytes(t) * peers, _nbytes(t) * peers, peers, time.perf_counter() - t0)


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """``dist.all_reduce`` (sum, in place); counted as a reduce-scatter plus an all-gather (``2 (P-1)/P`` of the
    buffer sent and received)."""
    t0 = time.perf_counter()
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        raise _fail(what, "all", group, err) from err
    world = dist.get_world_size(group)
    size = 2 * _nbytes(t) * (world - 1) // world
    _record(what, size, size, world - 1, time.perf_counter() - t0)
