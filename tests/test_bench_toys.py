"""The benchmarks of benchmarks/options.py and benchmarks/packed.py run at a toy size, so that they do
not rot between measurement sessions."""
import pytest

pytest.importorskip("grpo_fast._C_cpu", reason="the CPU extension is not built")


def test_options_benchmark_runs_every_case():
    from benchmarks import options as bench

    rows = bench.run((4, 8, 64), "fp32", "cpu", repeats=1)
    names = {r["case"] for r in rows}
    assert names == set(bench.fused_cases()) | set(bench.primitive_cases()) | set(bench.verl_fused_cases())
    assert {r["path"] for r in rows} == {"fused", "primitive", "verl fused"}
    order = [r["case"] for r in rows]
    for name, mode in bench.verl_fused_cases().items():  # each fused verl row just above its primitive one
        assert order.index(f"verl {mode}") == order.index(name) + 1
    assert all(r["ms"] > 0 for r in rows)
    assert bench.main(["--shape", "4,8,64", "--repeats", "1", "--no-save"]) == 0


def test_packed_benchmark_runs_every_layout():
    from benchmarks import packed as bench

    rows, pad = bench.run((4, 10, 64), "fp32", "cpu", 0.3, repeats=1)
    assert abs(pad - 0.3) < 0.03
    assert {(r["level"], r["layout"]) for r in rows} == {
        (lv, k) for lv in ("token", "sequence")
        for k in ("padded, all rows swept", "padded, masked", "packed (cu_seqlens)")}


def test_packed_benchmark_fused_linear_path():
    from benchmarks import packed as bench

    rows, pad = bench.run_linear((4, 10, 64), "fp32", "cpu", 0.3, repeats=1, H=8)
    assert abs(pad - 0.3) < 0.03
    assert {(r["level"], r["layout"]) for r in rows} == {
        (lv, k) for lv in ("token", "sequence")
        for k in ("padded, all rows swept", "padded, masked", "packed (cu_seqlens)")}
    assert all(r["ms"] > 0 for r in rows)
    assert bench.main(["--path", "fused-linear", "--quick", "--repeats", "1", "--no-save"]) == 0
