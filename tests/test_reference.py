"""The eager reference against hand-worked values, an independent scalar re-derivation of docs/spec.md,
and finite differences (torch.autograd.gradcheck) in float64."""
import itertools
import math

import pytest
import torch

import grpo_fast
from grpo_fast.reference import group_advantages_reference, grpo_loss_reference, token_logprobs_reference

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]
CLIP = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]


# ---------------------------------------------------------------------------------------------
# An independent oracle: docs/spec.md written as plain Python loops over floats (no torch ops).


def scalar_loss(z, y, A, old, ref, m, *, beta, kl_estimator, eps_low, eps_high, delta, loss_type, level,
                temperature, isr, mcl, num_items, sapo_pos, sapo_neg, bias_kl):
    B, T, V = len(z), len(z[0]), len(z[0][0])
    logp = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            x = [v / temperature for v in z[b][t]]
            mx = max(x)
            lse = mx + math.log(sum(math.exp(v - mx) for v in x))
            logp[b][t] = x[y[b][t]] - lse
    old = old if old is not None else logp
    L = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = max(sum(m[b]), 1.0)
        s_row = sum(m[b][t] * (logp[b][t] - old[b][t]) for t in range(T)) / n
        for t in range(T):
            r = math.exp(logp[b][t] - old[b][t] if level == "token" else s_row)
            a = A[b][t]
            if loss_type in CLIP:
                r2 = min(max(r, 1 - eps_low), 1 + eps_high)
                r1 = min(r, delta) if delta is not None else r
                li = -min(r1 * a, r2 * a)
            elif loss_type == "cispo":
                li = -min(r, eps_high) * a * logp[b][t]
            else:
                ts = sapo_pos if a > 0 else sapo_neg
                li = -(4 / ts) * (1 / (1 + math.exp(-ts * (r - 1)))) * a
            if isr is not None:
                li *= isr[b][t]
            if beta != 0:
                d = ref[b][t] - logp[b][t]
                kl = {"k3": math.exp(d) - d - 1, "k1": -d, "k2": d * d / 2}[kl_estimator]
                if bias_kl:
                    kl *= r
                li += beta * kl
            L[b][t] = li
    tot = sum(sum(m[b][t] for t in range(T)) for b in range(B))
    if loss_type in ("grpo", "sapo"):
        return sum(sum(m[b][t] * L[b][t] for t in range(T)) / max(sum(m[b]), 1.0) for b in range(B)) / B
    if loss_type == "bnpo":
        return sum(m[b][t] * L[b][t] for b in range(B) for t in range(T)) / max(tot, 1.0)
    if loss_type == "dr_grpo":
        return sum(m[b][t] * L[b][t] for b in range(B) for t in range(T)) / (B * mcl)
    if loss_type in ("dapo", "cispo"):
        n = tot if num_items is None else num_items
        return sum(m[b][t] * L[b][t] for b in range(B) for t in range(T)) / max(n, 1.0)
    return sum(sum(m[b][t] * L[b][t] for t in range(T)) for b in range(B)) / B  # luspo


def _inputs(B=4, T=3, V=7, seed=0, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    A = torch.randn(B, T, generator=g, dtype=torch.float64) if adv_per_token else torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp = token_logprobs_reference(z, y, 0.7)
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios spread across the clip range
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    m = (torch.rand(B, T, generator=g) > 0.3).double()
    m[0] = 1.0
    m[1] = 0.0  # a fully masked row
    isr = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return z, y, A, old, ref, m, isr


@pytest.mark.parametrize("loss_type,level,kl_est", [
    (lt, lvl, kl) for lt, lvl, kl in itertools.product(LOSS_TYPES, ["token", "sequence"], ["k3", "k1", "k2"])
])
def test_reference_matches_scalar_oracle(loss_type, level, kl_est):
    z, y, A, old, ref, m, isr = _inputs(adv_per_token=(kl_est == "k2"))
    delta = 1.5 if loss_type in CLIP and kl_est == "k1" else None
    opts = dict(beta=0.07, kl_estimator=kl_est, epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 1.3,
                delta=delta, loss_type=loss_type, importance_sampling_level=level, temperature=0.7,
                max_completion_length=5, num_items_in_batch=(6 if kl_est == "k3" else None),
                sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, use_bias_correction_kl=(kl_est == "k3"))
    loss, _ = grpo_loss_reference(z, y, A, old_logp=old, ref_logp=ref, completion_mask=m,
                                  importance_sampling_ratio=isr, **opts)
    A2 = A.tolist() if A.dim() == 2 else [[a] * z.shape[1] for a in A.tolist()]
    want = scalar_loss(z.tolist(), y.tolist(), A2, old.tolist(), ref.tolist(), m.tolist(),
                       beta=0.07, kl_estimator=kl_est, eps_low=0.2, eps_high=opts["epsilon_high"], delta=delta,
                       loss_type=loss_type, level=level, temperature=0.7, isr=isr.tolist(), mcl=5,
                       num_items=opts["num_items_in_batch"], sapo_pos=1.0, sapo_neg=1.05,
                       bias_kl=opts["use_bias_correction_kl"])
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want) <= 1e-12 * max(1.0, abs(want)), (loss.item(), want)


def test_hand_worked_values():
    # One token, V = 2, logits (0, ln 3): p = (1/4, 3/4); target 1 -> logp = ln 0.75.
    z = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    y = torch.tensor([[1]])
    logp, ent = token_logprobs_reference(z, y, return_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-15)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-15)
    # Off-policy ratio r = 0.75 / 0.5 = 1.5, A = 2, eps = 0.2: clipped at 1.2 -> L = -2.4.
    old = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    loss, met = grpo_loss_reference(z, y, torch.tensor([2.0], dtype=torch.float64), old_logp=old, loss_type="grpo")
    assert loss.item() == pytest.approx(-2.4, abs=1e-12)
    assert met["clip_ratio_high"].item() == 1.0 and met["clip_ratio_low"].item() == 0.0
    # Negative advantage: min(1.5·(-2), 1.2·(-2)) = -3 -> L = 3; with delta = 1.4: min(1.4·(-2), -2.4) = -2.8.
    loss, _ = grpo_loss_reference(z, y, torch.tensor([-2.0], dtype=torch.float64), old_logp=old, loss_type="grpo")
    assert loss.item() == pytest.approx(3.0, abs=1e-12)
    loss, _ = grpo_loss_reference(z, y, torch.tensor([-2.0], dtype=torch.float64), old_logp=old, loss_type="grpo", delta=1.4)
    assert loss.item() == pytest.approx(2.8, abs=1e-12)
    # k3 KL with ref = ln 0.5: d = ln(0.5/0.75), kl = 2/3 - ln(2/3) - 1.
    ref = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    loss, met = grpo_loss_reference(z, y, torch.tensor([0.0], dtype=torch.float64), ref_logp=ref, beta=1.0)
    kl = 2 / 3 - math.log(2 / 3) - 1
    assert met["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(kl, abs=1e-12)


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3])
    a = grpo_fast.group_advantages(r, 2)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0.0, 0.0]))
    assert (a[4:] == 0).all()  # equal rewards: exactly zero, never NaN
    a = grpo_fast.group_advantages(r, 2, scale_rewards="none")
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))
    a = grpo_fast.group_advantages(r, 3, scale_rewards="batch", adv_eps=0.0)
    sb = r.double().std().item()
    mu1, mu2 = 1 / 3, 1.6 / 3
    want = torch.tensor([(1 - mu1) / sb, -mu1 / sb, -mu1 / sb, (1 - mu2) / sb, (0.3 - mu2) / sb, (0.3 - mu2) / sb])
    torch.testing.assert_close(a, want.float())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_reference_gradient_matches_finite_differences(loss_type, level):
    z, y, A, old, ref, m, isr = _inputs(B=2, T=3, V=5, seed=1)
    m[1, 0] = 1.0  # keep the second row partly valid
    z.requires_grad_(True)

    def f(zz):
        return grpo_loss_reference(zz, y, A, old_logp=old, ref_logp=ref, completion_mask=m, beta=0.1,
                                   loss_type=loss_type, importance_sampling_level=level, temperature=0.9,
                                   importance_sampling_ratio=isr, use_bias_correction_kl=True,
                                   # cispo stops the gradient through min(r, ε_high): with ε_high below every
                                   # ratio that factor is the constant ε_high, so finite differences apply.
                                   epsilon_high=(0.01 if loss_type == "cispo" else None))[0]

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_on_policy_ratio_is_one_but_gradient_flows():
    z, y, A, _, _, m, _ = _inputs(seed=2)
    z.requires_grad_(True)
    loss, met = grpo_loss_reference(z, y, A, completion_mask=m, loss_type="bnpo")
    loss.backward()
    assert met["clip_ratio"].item() == 0.0
    # r = 1, so L = -A per token, and dL/dlogp = -A·w: the gradient is that times (onehot - p).
    assert loss.item() == pytest.approx(-(A[:, None] * m).sum().item() / m.sum().item(), rel=1e-12)
    assert z.grad.abs().sum() > 0


def test_public_torch_backend_equals_reference():
    z, y, A, old, ref, m, isr = _inputs(seed=3)
    zf = z.float().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(zf, y, A.float(), old_logp=old.float(), ref_logp=ref.float(), completion_mask=m.bool(),
                                    beta=0.04, backend="torch")
    loss.backward()
    z64 = z.clone().requires_grad_(True)
    want, wmet = grpo_loss_reference(z64, y, A, old_logp=old.float().double(), ref_logp=ref.float().double(), completion_mask=m, beta=0.04)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zf.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)
    assert set(met) == {"entropy", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio"}
    for k in met:
        assert met[k].dtype == torch.float32 and not met[k].requires_grad
        torch.testing.assert_close(met[k].double(), wmet[k].double(), rtol=1e-5, atol=1e-6)


def test_neg_inf_logits_get_zero_probability():
    z, y, A, old, ref, m, _ = _inputs(seed=4)
    z[..., 0] = -float("inf")
    y = torch.where(y == 0, torch.ones_like(y), y)
    z.requires_grad_(True)
    loss, met = grpo_loss_reference(z, y, A, old_logp=old, completion_mask=m, loss_type="grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(met["entropy"])
    assert (z.grad[..., 0] == 0).all() and torch.isfinite(z.grad).all()


def test_gradient_only_where_mask_is_set():
    z, y, A, old, ref, m, _ = _inputs(seed=5)
    z.requires_grad_(True)
    grpo_loss_reference(z, y, A, old_logp=old, ref_logp=ref, beta=0.1, completion_mask=m, loss_type="dapo")[0].backward()
    assert (z.grad[m == 0] == 0).all()
    assert (z.grad[m == 1].abs().sum(-1) > 0).all()


def test_grpo_loss_module_forwards_options():
    z, y, A, old, ref, m, _ = _inputs(seed=6)
    crit = grpo_fast.GRPOLoss(loss_type="grpo", beta=0.02, backend="torch")
    a, _ = crit(z.float(), y, A.float(), old_logp=old.float(), ref_logp=ref.float(), completion_mask=m)
    b, _ = grpo_fast.grpo_loss(z.float(), y, A.float(), old_logp=old.float(), ref_logp=ref.float(), completion_mask=m,
                               loss_type="grpo", beta=0.02, backend="torch")
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="unknown options"):
        grpo_fast.GRPOLoss(loss_typ="grpo")
    with pytest.raises(ValueError, match="per-call"):
        grpo_fast.GRPOLoss(ref_logp=ref)


def test_token_level_metrics_at_t1_are_token_means_not_row_means():
    # T = 1 makes token-level flags (B, 1), the shape of sequence-level ones; they are still tokens:
    # the masked-out row must not count (it would with a row mean).
    z = torch.zeros(2, 1, 3, dtype=torch.float64)
    y = torch.zeros(2, 1, dtype=torch.long)
    old = torch.full((2, 1), math.log(1 / 3) - 0.5, dtype=torch.float64)  # r = e^0.5 > 1.2 on both rows
    m = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    _, met = grpo_loss_reference(z, y, torch.tensor([1.0, 1.0], dtype=torch.float64), old_logp=old, completion_mask=m)
    assert met["clip_ratio_high"].item() == 1.0
    _, met = grpo_loss_reference(z, y, torch.tensor([1.0, 1.0], dtype=torch.float64), old_logp=old, completion_mask=m,
                                 importance_sampling_level="sequence")
    assert met["clip_ratio_high"].item() == 0.5  # sequence level: one flag per row, masked row's r = 1


def test_loss_benchmark_runs_every_cpu_provider(tmp_path):
    """benchmarks/loss.py at a toy size, in process: every CPU provider runs and agrees with eager, and
    the command's exit status says so (the benchmark must not rot between benchmark runs)."""
    from benchmarks import loss as bench

    res = bench.run(shapes=[(8, 4, 64)], dtypes=["fp32"], providers=["eager", "cpu", "cpu-inplace"], repeats=1,
                    warmup=0, memory=False, out_dir=str(tmp_path), plot=False, log=lambda *a: None)
    assert {r["provider"] for r in res["rows"]} == {"eager", "cpu", "cpu-inplace"}
    bad = [(r["provider"], r["mode"], r.get("check")) for r in res["rows"] if r["mode"] == "error"]
    assert not bad, bad
    assert bench.main(["--shapes", "8x4x64", "--dtypes", "fp32", "--providers", "eager,cpu", "--repeats", "1",
                       "--warmup", "0", "--no-memory", "--no-save"]) == 0
