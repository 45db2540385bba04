"""GPU-only checks run by benchmarks/gpu_suite.sh (each a subcommand; all need a CUDA device).

    python -m benchmarks.gpu_checks sanitize [--big]   the edge inputs through the Triton and CUDA kernels,
                                                       to run under compute-sanitizer (memcheck / racecheck /
                                                       initcheck): inplace, misaligned V, misaligned base
                                                       pointer, strided rows, all-(−inf) rows; --big adds one
                                                       input of more than 2^31 elements
    python -m benchmarks.gpu_checks peers              head-to-head timing (MEASURED) against Liger's
                                                       triton_grpo_loss (the loss) and flash-attn's Triton
                                                       cross-entropy (as a log-prob provider) at V = 32k,
                                                       128k, 152k, bf16 and fp32; a missing peer is skipped
                                                       with a line saying so
    python -m benchmarks.gpu_checks addmm              the fused-linear path's bf16 -> fp32 addmm fast path
                                                       (torch.addmm(out_dtype=float32)): taken, and correct
                                                       against float64, with beta = 0 ignoring NaN in out

Exit status: 0 when everything ran (and, for addmm, the fast path is taken and correct), 1 otherwise,
2 without a CUDA device.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

VOCABS = (32000, 128256, 151936)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _backends() -> list:
    from grpo_fast.backends import unavailable_reason

    out = []
    for b in ("triton", "cuda"):
        why = unavailable_reason(b, torch.device("cuda"))
        if why:
            print(f"[skip] backend {b}: {why}")
        else:
            out.append(b)
    return out


def _inputs(B, T, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(B, T, V, device="cuda", dtype=dtype, generator=g)
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.ones(B, T, device="cuda")
    mask[-1, T // 2:] = 0
    kw = dict(rewards=torch.rand(B, device="cuda", generator=g), group_size=2, completion_mask=mask,
              old_logp=torch.randn(B, T, device="cuda", generator=g) - 5, beta=0.04,
              ref_logp=torch.randn(B, T, device="cuda", generator=g) - 5)
    return z, y, kw


def _loss_and_grad(z, y, backend, level="token", inplace=False, **kw):
    """Loss and gradient with ``z`` itself as the leaf: its strides and address are what the kernels
    see (a clone would be contiguous and aligned); inplace overwrites it."""
    import grpo_fast

    zz = z.detach().requires_grad_(True)
    loss, _ = grpo_fast.grpo_loss(zz, y, backend=backend, importance_sampling_level=level, inplace=inplace, **kw)
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), zz.grad


def _edge_cases(dtype):
    """name -> a function making (logits, ids) afresh (inplace runs overwrite the logits)."""
    B, T, V = 4, 8, 1000

    def ids(v):
        return torch.randint(0, v, (B, T), device="cuda")

    def all_inf():
        z = torch.randn(B, T, V, device="cuda", dtype=dtype)
        z[0, 0] = float("-inf")
        z[1, :] = float("-inf")
        return z, ids(V)

    return {
        "contiguous V=1000": lambda: (torch.randn(B, T, V, device="cuda", dtype=dtype), ids(V)),
        "misaligned V=1003 (no 16-byte rows)": lambda: (torch.randn(B, T, 1003, device="cuda", dtype=dtype), ids(1003)),
        "base pointer off by one element": lambda: (torch.randn(B * T * V + 1, device="cuda", dtype=dtype)[1:].view(B, T, V),
                                                    ids(V)),
        "strided rows (row stride 1064)": lambda: (torch.randn(B, T, 1064, device="cuda", dtype=dtype)[..., :V], ids(V)),
        "all-(-inf) rows": all_inf,
    }


def sanitize(big: bool) -> int:
    import grpo_fast

    failures = 0
    _, _, kw = _inputs(4, 8, 1000, torch.float32)
    for backend in _backends():
        for dtype in (torch.bfloat16, torch.float32):
            for name, make in _edge_cases(dtype).items():
                for level in ("token", "sequence"):
                    for inplace in (False, True):
                        zc, yc = make()
                        if inplace and not zc.is_contiguous():
                            continue
                        try:
                            _loss_and_grad(zc, yc, backend, level, inplace, **kw)
                            lp = make()[0].requires_grad_(True)
                            out = grpo_fast.logprobs(lp, yc, temperature=0.9, return_entropy=True, backend=backend)
                            (out[0].sum() + out[1].sum()).backward()
                            torch.cuda.synchronize()
                        except Exception as e:  # noqa: BLE001 - report every case
                            failures += 1
                            print(f"FAILED {backend} {dtype} {name} {level} inplace={inplace}: {e!r}")
                print(f"ran {backend} {str(dtype):15s} {name}")
        if big:
            # B·T·V > 2^31 elements (int64 offsets): 16400 rows of 131072 bf16 logits, 4.3 GB
            B, T, V = 2, 8200, 131072
            zb = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16)
            yb = torch.randint(0, V, (B, T), device="cuda")
            try:
                _loss_and_grad(zb, yb, backend, "token", True, rewards=torch.rand(B, device="cuda"), group_size=2)
                print(f"ran {backend} > 2^31 elements ({B * T * V}), inplace")
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAILED {backend} > 2^31 elements: {e!r}")
            del zb
            torch.cuda.empty_cache()
    print(f"{failures} case(s) failed")
    return 1 if failures else 0


def _time(fn, leaf) -> float:
    """Median ms of fn (forward + backward); ``leaf``'s .grad is dropped between runs, untimed (an
    accumulating gradient would add an (N, V) add to every run)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=100, grad_to_none=[leaf]))


def _time_peer(what: str, fn, leaf) -> float:
    """_time(fn, leaf), or NaN with a line saying why when the peer fails."""
    try:
        return _time(fn, leaf)
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
        print(f"{what} failed: {e!r}")
        return float("nan")


def peers() -> int:
    import grpo_fast

    have_liger = importlib.util.find_spec("liger_kernel") is not None
    have_fa = importlib.util.find_spec("flash_attn") is not None
    if not have_liger:
        print("[skip] Liger (liger_kernel) is not installed: no triton_grpo_loss column (pip install liger-kernel)")
    if not have_fa:
        print("[skip] flash-attn is not installed: no Triton cross-entropy column (pip install flash-attn)")
    backends = _backends()
    print(f"MEASURED on {torch.cuda.get_device_name()}: median ms of forward + backward (triton.testing.do_bench)")
    print("loss: token-level dapo, beta 0.04, old/ref log-probs, (B, T) = (4, 1024); "
          "log-probs: (4096, V) with a gradient")
    head = f"{'V':>7s} {'dtype':5s} " + "".join(f"{'loss ' + b:>14s}" for b in backends) + \
        (f"{'loss liger':>14s}" if have_liger else "") + "".join(f"{'logp ' + b:>14s}" for b in backends) + \
        (f"{'logp flash-CE':>14s}" if have_fa else "")
    print(head)
    rc = 0
    for V in VOCABS:
        for dname, dtype in DTYPES.items():
            B, T = 4, 1024
            z, y, _ = _inputs(B, T, V, dtype)
            old = torch.randn(B, T, device="cuda") - 5
            ref = torch.randn(B, T, device="cuda") - 5
            adv = torch.randn(B, device="cuda")
            cells = []
            for b in backends:
                zz = z.clone().requires_grad_(True)

                def run(zz=zz, b=b):
                    loss, _ = grpo_fast.grpo_loss(zz, y, adv, old_logp=old, ref_logp=ref, beta=0.04, loss_type="dapo",
                                                  temperature=0.9, backend=b)
                    loss.backward()
                cells.append(_time(run, zz))
            if have_liger:
                from liger_kernel.transformers.grpo_loss import triton_grpo_loss

                # Liger takes (B, T + 1, V) logits (it drops the last position), and is inplace by default
                zl = torch.cat([z, z[:, :1]], 1).requires_grad_(True)

                def run_liger():
                    loss, _ = triton_grpo_loss(zl, old, ref, y, adv, temperature=0.9, beta=0.04, loss_type="dapo",
                                               inplace=False, reduce=True)
                    loss.backward()
                cells.append(_time_peer(f"liger at V={V} {dname}", run_liger, zl))
            zf = z.view(B * T, V)
            yf = y.view(B * T)
            for b in backends:
                zz = zf.clone().requires_grad_(True)

                def run_lp(zz=zz, b=b):
                    grpo_fast.logprobs(zz, yf, backend=b).sum().backward()
                cells.append(_time(run_lp, zz))
            if have_fa:
                from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

                zz = zf.clone().requires_grad_(True)

                def run_fa():
                    losses, _ = cross_entropy_loss(zz, yf)
                    (-losses).sum().backward()  # log-prob = −cross-entropy
                cells.append(_time_peer(f"flash-attn cross-entropy at V={V} {dname}", run_fa, zz))
            print(f"{V:7d} {dname:5s} " + "".join(f"{c:14.3f}" for c in cells))
            rc = rc or int(any(c != c for c in cells))
            del z
            torch.cuda.empty_cache()
    return rc


def addmm() -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(512, 256, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(512, 384, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.full((256, 384), float("nan"), device="cuda")
    try:
        torch.addmm(out, a.t(), b, beta=0.0, out_dtype=torch.float32, out=out)
        torch.addmm(out, a.t(), b, beta=1.0, out_dtype=torch.float32, out=out)
    except (TypeError, RuntimeError) as e:
        print(f"bf16 -> fp32 addmm fast path NOT available (torch {torch.__version__}): {e!r}; "
              "grpo_fast.fused_linear falls back to float32 copies")
        return 1
    want = 2 * (a.double().t() @ b.double())
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    ok = bool(torch.isfinite(out).all()) and err < 1e-5
    print(f"bf16 -> fp32 addmm fast path: available on {torch.cuda.get_device_name()} (torch {torch.__version__}); "
          f"beta=0 ignores NaN in out: {bool(torch.isfinite(out).all())}; max rel. error vs float64 {err:.2e}: "
          f"{'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("sanitize", "peers", "addmm"))
    ap.add_argument("--big", action="store_true", help="sanitize: add a > 2^31-element input")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: these checks are for a GPU machine")
        return 2
    return {"sanitize": lambda: sanitize(args.big), "peers": peers, "addmm": addmm}[args.what]()


if __name__ == "__main__":
    sys.exit(main())
