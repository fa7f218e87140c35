"""``benchmarks/gpu_check.py`` on CPU with ``--quick``: every correctness row it makes passes (the block-sparse
engine's matmul kernel, which every non-CPU device runs, included), both tables print, and a broken engine or
mechanism fails its own row only, with the exit status saying so."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import nearfar
from nearfar.bench.timing import EXAMPLES

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


@pytest.fixture(scope="module")
def gc():
    sys.path.insert(0, BENCH)
    try:
        import gpu_check
    finally:
        sys.path.remove(BENCH)
    return gpu_check


@pytest.fixture(scope="module")
def quick_run(gc, tmp_path_factory):
    """One ``--device cpu --quick`` run (eager Flex, as the engine tests run it): exit status, text, JSON."""
    import torch._dynamo

    from nearfar.backends import flex

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = getattr(config, name)
    path = tmp_path_factory.mktemp("gpu_check") / "out.json"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEARFAR_FLEX_COMPILE", "0")
        flex._compiled.cache_clear()
        try:
            rc = gc.main(["--device", "cpu", "--quick", "--rounds", "1", "--json", str(path)], out=lines.append)
        finally:
            flex._compiled.cache_clear()
            setattr(config, name, limit)
    return rc, "\n".join(lines), json.loads(path.read_text())


def test_every_correctness_row_passes_on_cpu(quick_run):
    rc, text, res = quick_run
    rows = res["rows"]
    assert rc == 0 and "0 correctness rows failed" in text
    assert [r for r in rows if r["status"] not in ("pass", "n/a")] == []
    # n/a only where said: bf16 eager Flex on CPU, and whole language models
    assert {(r["engine"], r["dtype"]) for r in rows if r["status"] == "n/a"} == {("flex", "bfloat16"), ("-", "-")}
    pattern_rows = [r for r in rows if r["section"] == "pattern"]
    want = [ex.name for ex in EXAMPLES] + ["GQA Hq=4 Hkv=2, sliding-window+sinks causal",
                                           "key_padding_mask, neighborhood-1d"]
    assert list(dict.fromkeys(r["case"] for r in pattern_rows)) == want
    for case in want:
        for dtype in ("float32", "bfloat16"):
            got = {r["engine"] for r in pattern_rows if r["case"] == case and r["dtype"] == dtype}
            windows = case.startswith(("swin", "maxvit"))
            assert got == {"dense", "blocksparse", "blocksparse[matmul]", "flex", "auto"} | (
                {"partition"} if windows else set()), (case, dtype)
    passed = [r for r in pattern_rows if r["status"] == "pass"]
    assert all(r["out_err"] <= r["tol"] for r in passed)
    assert all(r["grad_err"] is not None for r in passed if r["engine"] != "flex")  # backward everywhere but CPU Flex
    mech = {r["case"].split()[0] for r in rows if r["section"] == "mechanism" and r["status"] == "pass"}
    assert mech == {m.name for m in nearfar.mechanisms(kind="layer")}


def test_block_sparse_matmul_kernel_is_checked_forward_and_backward(quick_run):
    rows = [r for r in quick_run[2]["rows"] if r["engine"] == "blocksparse[matmul]"]
    assert len(rows) == 2 * (len(EXAMPLES) + 2)
    for r in rows:
        assert r["status"] == "pass" and r["grad_err"] <= r["tol"] and r["out_err"] <= r["tol"], r
    # fp32 matches float64 to summation order, far inside the tolerance
    assert max(max(r["out_err"], r["grad_err"]) for r in rows if r["dtype"] == "float32") < 1e-5


def test_both_tables_print(quick_run):
    _, text, res = quick_run
    assert "### Correctness" in text and "| section | case | engine | dtype |" in text
    assert "### Timing" in text and "| case | dtype | phase | nearfar ms |" in text
    timing = res["timing"]
    assert [(t["case"], t["dtype"], t["phase"]) for t in timing] == [
        (c, d, p) for c in ("C1", "C2", "C3", "C4") for d in ("float32", "bfloat16")
        for p in (("fwd", "fwd+bwd") if c in ("C1", "C2") else ("fwd",))]
    for t in timing:
        assert {"nearfar", "SDPA"} <= set(t["ms"]) and t["sdpa"] in ("flash", "efficient")
        assert ("Flex" in t["ms"]) == (t["phase"] == "fwd"), t  # CPU Flex is forward-only: said in its row
        assert f"| {t['case']} | {t['dtype']} | {t['phase']} | {t['ms']['nearfar']:.2f} |" in text


def test_a_broken_engine_fails_only_its_row(gc, monkeypatch):
    import gpu_check_correct as C

    forward = C._forward

    def broken(engine, *args):
        if engine == "blocksparse":
            raise RuntimeError("boom")
        out = forward(engine, *args)
        return out * 1.01 if engine == "auto" else out  # a wrong result, not an error

    monkeypatch.setattr(C, "_forward", broken)
    case = C.Case("tiny", nearfar.Neighborhood(9), 40, heads=2, kv_heads=1, dim=8, batch=2, padded=True)
    rows = {r.engine: r for r in C.check_case(case, torch.float32, torch.device("cpu"), C.Budget(60.0),
                                              only=("dense", "blocksparse", "blocksparse[matmul]", "auto"))}
    assert rows["blocksparse"].status == "FAIL" and "RuntimeError: boom" in rows["blocksparse"].note
    assert rows["auto"].status == "FAIL" and 5e-3 < rows["auto"].out_err < 2e-2
    assert rows["dense"].status == rows["blocksparse[matmul]"].status == "pass"
    assert all(r.status == "skipped" for r in C.check_case(case, torch.float32, torch.device("cpu"), C.Budget(0.0)))


def test_a_broken_mechanism_fails_its_row_and_the_exit_status(gc, monkeypatch):
    import gpu_check_correct as C

    grads = C._module_grads

    def off(layer, x, ctx, engine):
        res = grads(layer, x, ctx, engine)
        return [res[0] + (engine == "blocksparse")] + res[1:]

    layer = nearfar.mechanisms("window")[0]

    def cases(quick):
        yield "broken", lambda: 1 / 0, (1, 24, 32), None
        yield "fine", lambda: layer.make(32, 2), (1, 14, 14, 32), None

    monkeypatch.setattr(C, "_module_grads", off)
    monkeypatch.setattr(C, "mechanism_cases", cases)
    rows = C.check_mechanisms(torch.device("cpu"), True, C.Budget(60.0))
    assert [(r.case, r.engine, r.status) for r in rows] == [("broken", "dense (reference)", "FAIL"),
                                                            ("fine", "auto", "pass"), ("fine", "blocksparse", "FAIL")]
    monkeypatch.setattr(gc, "check_all", lambda device, quick, budget: rows)
    lines: list[str] = []
    assert gc.main(["--device", "cpu", "--quick", "--skip-timing"], out=lines.append) == 1
    assert "2 correctness rows failed" in lines[-1] and "ZeroDivisionError" in "\n".join(lines)
