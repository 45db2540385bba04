"""`python -m benchmarks kernels`: the Triton kernels compile for sm_80 and sm_90 without a GPU, as
the launcher specializes them (÷16 and unaligned), none of the pinned configs spills registers, and
the aligned builds load the logits in 16-byte vectors."""
import importlib.util
import sys
import types

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _report():
    from benchmarks import kernel_report

    if kernel_report.ptxas_path() is None:
        pytest.skip("ptxas is not shipped with this Triton wheel (set TRITON_PTXAS_PATH)")
    return kernel_report


@pytest.fixture(scope="module")
def rows():
    kr = _report()
    return kr.triton_report(archs=(80, 90), quick=True)


def test_default_configs_compile_without_spills(rows):
    kr = _report()
    from grpo_fast.backends.triton_backend import load_kernels, pinned_configs

    KERNELS = load_kernels().KERNELS

    assert {r.kernel for r in rows} == set(KERNELS)
    assert {r.arch for r in rows} == {"sm_80", "sm_90"}
    streaming = [r for r in rows if r.kernel != "_grpo_seq_row_kernel"]
    # the largest pinned block of each arch, bf16 and fp32, ÷16 and unaligned
    assert len(streaming) == kr.STREAMING_KERNELS * 2 * 2 * 2
    for r in rows:
        assert 0 < r.registers <= 255, r
        assert r.spill_bytes == 0, f"{r.kernel} [{r.variant}; {r.config}] {r.arch} spills {r.spill_bytes} bytes"
        assert r.local_bytes == 0, r
    for arch in (80, 90):
        labels = {f"BLOCK_V={bv} warps={nw}" for bv, nw, _ in pinned_configs(arch)}
        assert {r.config for r in streaming if r.arch == f"sm_{arch}"} <= labels
    table = kr.format_table(rows)
    assert "_grpo_token_fwd_kernel" in table and "sm_90" in table and "ld vec B" in table


def test_report_compiles_what_runs(rows):
    """Regression test on the launcher's specialization: with pointers, V and the row strides ÷16
    every V-streaming kernel reads (and the gradient kernels write) the logits in 16-byte vectors;
    unaligned they are element-wide. The token-level loss creates the evict-last policy (sweep 1)
    and the evict-first one (sweep 2 loads, gradient stores); the sequence-level gradient pass,
    which reads each row once, only evict-first."""
    streaming = [r for r in rows if r.kernel != "_grpo_seq_row_kernel"]
    for r in streaming:
        if r.align == "÷16":
            assert r.ld_vec_bytes == 16, r
            if r.kernel in ("_grpo_token_fwd_kernel", "_grpo_grad_kernel", "_logprobs_bwd_kernel"):
                assert r.st_vec_bytes == 16, r
        else:
            assert r.align == "unaligned" and r.ld_vec_bytes == 0 and r.st_vec_bytes == 0, r
        if r.kernel == "_grpo_token_fwd_kernel":
            assert r.l2_policies == "evict_first,evict_last", r
        elif r.kernel == "_grpo_grad_kernel":
            assert r.l2_policies == "evict_first", r
    assert {r.align for r in streaming} == {"÷16", "unaligned"}


def test_ptx_memory_ops_parser():
    kr = _report()
    ptx = """
    createpolicy.fractional.L2::evict_last.b64 %rd1, 1.0;
    @%p1 ld.global.L1::evict_last.L2::cache_hint.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ], %rd1;
    @!%p2 ld.global.b16 %rs1, [ %rd3 + 0 ];
    ld.global.v2.b32 { %r5, %r6 }, [ %rd4 + 0 ];
    st.global.b32 [ %rd5 + 0 ], %r7;
    """
    assert kr.ptx_memory_ops(ptx) == dict(ld_vec_bytes=16, st_vec_bytes=0, l2_policies="evict_last")
    assert kr.ptx_memory_ops("ld.global.b16 %rs1, [ %rd3 + 0 ];") == dict(ld_vec_bytes=0, st_vec_bytes=0, l2_policies="")


def test_exit_status_and_cuda_rows(rows, monkeypatch, capsys, tmp_path):
    kr = _report()
    monkeypatch.setattr(kr, "triton_report", lambda archs, quick=False, variants=False: list(rows))
    # no CUDA resource helper (or one that reports no spills): exit 0
    fake = types.ModuleType("benchmarks.cuda_resources")
    entries = [dict(kernel="grpo_fwd_cuda", arch="sm_90", registers=40, spill_bytes=0, shared_bytes=128, local_bytes=0)]
    fake.cuda_kernel_resources = lambda: entries
    monkeypatch.setitem(sys.modules, "benchmarks.cuda_resources", fake)
    import benchmarks

    monkeypatch.setattr(benchmarks, "cuda_resources", fake, raising=False)
    out_json = tmp_path / "k.json"
    assert kr.main(["--quick", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "grpo_fwd_cuda" in text and "none spills" in text
    assert out_json.read_text().count('"kernel"') == len(rows) + 1
    # a spilling kernel makes the command fail
    entries[0]["spill_bytes"] = 64
    assert kr.main(["--quick"]) == 1
    assert "spill" in capsys.readouterr().out


def test_every_flag_variant_compiles_for_sm90():
    # The interpreter accepts code the GPU compiler rejects (a non-constexpr global, types that
    # differ between the branches of a constexpr if): compile each flag of each kernel once.
    kr = _report()
    rows = kr.triton_report(archs=(90,), variants=True)
    assert len(rows) == len(kr.variant_jobs())
    assert all(r.spill_bytes == 0 and r.registers > 0 for r in rows)


def test_roofline_model():
    from benchmarks import roofline

    rows = roofline.rows([(1024, 151936, "bf16")])
    by = {r["variant"]: r for r in rows}
    nv = 1024 * 151936
    assert by["fused fwd (no grad)"]["bytes"] == nv * 2
    assert by["fused fwd+grad, ideal"]["bytes"] == 2 * nv * 2
    assert by["fused bwd, grad_output = 1"]["bytes"] == 0
    assert by["eager fwd+bwd"]["bytes"] == by["eager fwd"]["bytes"] + by["eager bwd"]["bytes"]
    assert by["eager fwd+bwd"]["bytes"] > 10 * by["fused fwd+grad, 2 reads"]["bytes"]
    h100 = next(d for d in roofline.DEVICES if d.startswith("H100"))
    assert abs(by["fused fwd (no grad)"]["ms"][h100] - nv * 2 / 3.35e12 * 1e3) < 1e-9
    # the benchmark's call: (N, V, dtype-key) cases, a device type, its measured copy bandwidth
    text = roofline.format_table([(512, 8192, "fp32")], device="cuda", bandwidth_gbps=1500.0)
    assert text.startswith("MODEL") and "measured copy BW (1500 GB/s)" in text
    assert "measured" not in roofline.format_table([(512, 8192, "fp32")], device="cpu", bandwidth_gbps=20.0)
    assert "MODEL" in roofline.markdown()
