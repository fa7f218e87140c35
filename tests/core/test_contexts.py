"""``nearfar.contexts.Context``: the context variables behind ``engine_override``, ``observe_calls`` and the other
``with`` blocks keep ``contextvars`` semantics (set/reset, per thread), and ``torch.compile`` traces their reads
without a graph break while none is set, and still honours a block entered around a compiled call."""

from __future__ import annotations

import threading

import torch

import nearfar
from nearfar import contexts
from nearfar.contexts import Context
from nearfar.functional import engine_override, observe_calls


def test_set_reset_and_the_default():
    var = Context("test_var", 3)
    assert var.get() == 3
    token = var.set(5)
    assert var.get() == 5 and contexts._active >= 1
    inner = var.set(7)
    assert var.get() == 7
    var.reset(inner)
    assert var.get() == 5
    var.reset(token)
    assert var.get() == 3


def test_a_thread_sees_only_its_own_value_while_another_has_one_set():
    var = Context("test_threads", "default")
    entered, done, seen = threading.Event(), threading.Event(), []

    def other():
        token = var.set("other")
        entered.set()
        done.wait(10)
        var.reset(token)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    seen.append(var.get())  # the count says "look": this thread's own value is the default
    done.set()
    t.join()
    assert seen == ["default"] and var.get() == "default"


def test_compiled_attend_has_no_graph_break_and_honours_blocks_entered_later():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))

    def f(q, k, v):
        return nearfar.attend(q, k, v) * 2

    assert contexts._active == 0
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    compiled = torch.compile(f, backend="eager")
    plain = compiled(q, k, v)
    with observe_calls() as calls, engine_override("dense"):
        again = compiled(q, k, v)
    assert len(calls) == 1  # the block reached the compiled call (retraced for the set context)
    torch.testing.assert_close(again, plain)
    assert contexts._active == 0



def test_nested_blocks_reach_the_compiled_call_without_compiling_again():
    # a block entered around compiled code retraces it once; deeper nesting reuses that trace, and each enclosing
    # observer sees each call
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: nearfar.attend(q + 1, k, v) * 2, backend="eager")
    compiled(q, k, v)
    with observe_calls() as outer:
        compiled(q, k, v)
        frames = counters["frames"]["total"]
        with observe_calls(), observe_calls() as inner:
            compiled(q, k, v)
        compiled(q, k, v)
    assert counters["frames"]["total"] == frames
    assert len(inner) == 1 and len(outer) == 3  # every enclosing observer lists the call
