"""benchmarks/options.py (what each loss option costs) runs at a toy size: every case of both paths,
so that the benchmark does not rot between measurement sessions."""
import pytest

pytest.importorskip("grpo_fast._C_cpu", reason="the CPU extension is not built")


def test_options_benchmark_runs_every_case():
    from benchmarks import options as bench

    rows = bench.run((4, 8, 64), "fp32", "cpu", repeats=1)
    names = {r["case"] for r in rows}
    assert names == set(bench.fused_cases()) | set(bench.primitive_cases())
    assert {r["path"] for r in rows} == {"fused", "primitive"}
    assert all(r["ms"] > 0 for r in rows)
    assert bench.main(["--shape", "4,8,64", "--repeats", "1", "--no-save"]) == 0
