"""The loss benchmark's cases as pytest-benchmark tests, to store and compare runs with its tools.

    pytest benchmarks/test_bench_loss.py --benchmark-only [--bench-quick] [--bench-device cuda]
    pytest benchmarks/ --benchmark-only --benchmark-autosave && pytest-benchmark compare

One test per (case, provider, mode), grouped by "case mode" so each group's table compares the
providers. Same inputs, providers and modes as `python -m benchmarks loss` (benchmarks/loss.py);
timing by pytest-benchmark (pedantic: 5 rounds after 1 warm-up, the restore of consumed inputs and,
for "bwd", the forward run in its untimed setup). Peak memory and the bandwidth ratio are only in
`python -m benchmarks loss`. Each case also checks its loss and gradient slice against the eager
provider, so a benchmark of a wrong kernel fails instead of reporting a fast time.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import loss as L  # noqa: E402


def _config_cases(config):
    shapes = L.QUICK_SHAPES if config.getoption("--bench-quick") else L.FULL_SHAPES
    return L.make_cases(shapes, ["fp32", "bf16"])


def _config_providers(config):
    text = config.getoption("--bench-providers")
    device = torch.device(config.getoption("--bench-device"))
    if text:
        return [p for p in text.split(",") if p]
    names = L.default_providers(device, quick=False, compile_=False)
    return names


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    params, ids = [], []
    # Case outermost: the (large) inputs of one case are made once and reused by its tests.
    for case in _config_cases(cfg):
        for prov in _config_providers(cfg):
            for mode in L.MODES:
                if mode == "fwd" and L.PROVIDERS.get(prov) is not None and L.PROVIDERS[prov].inplace:
                    continue  # no gradient: inplace changes nothing
                params.append((case, prov, mode))
                ids.append(f"{case.name.replace(' ', '-')}-{prov}-{mode}")
    metafunc.parametrize("bench_case", params, ids=ids)


class _Inputs:
    """The inputs of one case at a time, with the eager result the providers are checked against."""

    key = None
    inputs = None
    backup = None
    ref = None

    @classmethod
    def get(cls, case, device):
        if cls.key != (case, device):
            cls.key, cls.inputs, cls.backup, cls.ref = None, None, None, None  # free the previous case first
            cls.inputs = L.make_inputs(case, device)
            cls.backup = cls.inputs["logits"].detach().clone()
            cls.key = (case, device)
        return cls.inputs, cls.backup

    @classmethod
    def reference(cls, case, device):
        if cls.ref is None:
            inputs, backup = cls.get(case, device)
            runner = L._Runner(L.PROVIDERS["eager"].build(inputs), inputs["logits"], backup, inplace=False)
            cls.ref = runner.result()
        return cls.ref


@pytest.fixture
def device(request):
    dev = torch.device(request.config.getoption("--bench-device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return dev


def test_loss(benchmark, bench_case, device, request):
    case, name, mode = bench_case
    prov = L.PROVIDERS.get(name)
    if prov is None:
        pytest.fail(f"unknown provider {name}; known: {sorted(L.PROVIDERS)}")
    why = prov.unavailable(device)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    inputs, backup = _Inputs.get(case, device)
    runner = L._Runner(prov.build(inputs), inputs["logits"], backup, prov.inplace)
    setup, call = runner.setup_for(mode), runner.call_for(mode)
    if device.type == "cuda":  # pytest-benchmark reads a host clock: wait for the kernels
        inner = call

        def call(*a):
            out = inner(*a)
            torch.cuda.synchronize(device)
            return out

    def pedantic_setup():
        arg = setup()
        return ((arg,), {}) if arg is not None else None

    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(provider=name, mode=mode, N=case.N, V=case.V, dtype=case.dtype,
                                bytes_moved=case.bytes_moved(mode), logits_bytes=case.logits_bytes)
    benchmark.pedantic(call, setup=pedantic_setup, rounds=3 if request.config.getoption("--bench-quick") else 5,
                       warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    nbytes = case.bytes_moved(mode)
    if stats is not None and nbytes:
        benchmark.extra_info["GB/s"] = nbytes / stats.stats.median / 1e9

    # The numbers are only worth keeping if the provider computes the right thing.
    ref_value, ref_grad = _Inputs.reference(case, device)
    value, grad = runner.result()
    status = L._check(value, grad, ref_value, ref_grad, case.dtype, prov.peer)
    benchmark.extra_info["check"] = status
    if prov.peer:
        return  # another project's numerics (e.g. TRL's bf16 log_softmax): recorded, not ours to fail
    assert status == "ok", (
        f"{name} disagrees with eager on {case.name}: loss {value} vs {ref_value}, "
        f"grad max |diff| {float((grad - ref_grad).abs().max()):.3e}")
