"""What each loss option costs: the fused loss with one option set vs the same loss without it.

    python -m benchmarks options [--quick] [--backend cpu] [--shape B,T,V] [--dtype fp32] [--repeats 7]

The loss-coverage issue's speed rule, measured in one run on one shape:

* **fused pass** options (computed inside the one kernel pass over the logits): ``grpo_fast.grpo_loss``
  with ``inplace=True`` (the gradient overwrites the logits, as the trainer and the TRL drop-in use
  it) for every loss type and option; each row's time over the default ``dapo`` row must stay
  within 1.10. One more row, ``inplace=False``, shows what a fresh gradient buffer costs (the
  primitive path cannot write in place: its backward runs after other ops may have read the logits).
* **primitive path** options (the loss written in torch on the per-token vectors of
  ``grpo_fast.logprobs(..., return_entropy=True, mask=mask)``, the padding not read: verl's policy losses of ``grpo_fast.verl_losses``,
  TRL's entropy bonus and off-policy mask): each row's time over the same ``dapo`` row must stay
  within 1.5.
* **verl fused**: verl's token-level losses in the fused pass (``verl_losses.fused_policy_loss``,
  ``inplace=True``), each row just above the same loss's primitive-path row: one run shows both
  (fused-pass limit, 1.10).

Inputs: random logits (std 2), ids, (B,) advantages, old/ref log-probs near the current ones, 25%
padding at the end of the rows. Time: median of ``--repeats`` fwd+bwd runs after one warm-up, every
case once per repeat (round-robin), so that load from other jobs hits all cases alike; the inputs an
in-place call overwrites are restored untimed before each run.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import common

FULL_SHAPE = (8, 512, 32000)
QUICK_SHAPE = (4, 64, 4096)
FUSED_LIMIT = 1.10
PRIMITIVE_LIMIT = 1.5


def _inputs(B: int, T: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[:, (3 * T) // 4:] = 0  # 25% padding
    mask[0, 1:] = 0  # and one almost empty row
    with torch.no_grad():
        cur = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = cur + 0.3 * torch.randn(B, T, generator=g)
    ref = cur + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    rewards = torch.rand(B, generator=g)
    isr = torch.rand(B, T, generator=g) * 0.5 + 0.75
    return {"logits": logits, "ids": ids, "mask": mask, "old": old, "ref": ref, "adv": adv,
            "rewards": rewards, "isr": isr}


def fused_cases() -> Dict[str, dict]:
    """name -> grpo_loss keywords (on top of ids, advantages, mask, old_logp)."""
    out = {"dapo (default)": {}, "dapo, inplace=False (fresh gradient buffer)": {"_inplace": False}}
    for lt in ("grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo"):
        out[f"loss_type={lt}"] = {"loss_type": lt, **({"epsilon_high": 5.0} if lt == "cispo" else {})}
    out["delta=3"] = {"delta": 3.0}
    out["epsilon_high=0.28"] = {"epsilon_high": 0.28}
    out["sequence level (GSPO)"] = {"importance_sampling_level": "sequence"}
    for k in ("k3", "k1", "k2"):
        out[f"beta=0.04 kl={k}"] = {"beta": 0.04, "kl_estimator": k, "_ref": True}
    out["beta=0.04 bias-corrected kl"] = {"beta": 0.04, "use_bias_correction_kl": True, "_ref": True}
    out["rewards+group_size (advantage in kernel)"] = {"_rewards": True, "group_size": 4}
    out["importance_sampling_ratio"] = {"_isr": True}
    out["temperature=0.7"] = {"temperature": 0.7}
    # TRL's entropy bonus in the fused pass (what the TRL drop-in now runs; the primitive row below is the old way)
    out["entropy_coef=0.01 (TRL entropy bonus)"] = {"entropy_coef": 0.01}
    out["entropy_coef=0.01, sequence level"] = {"entropy_coef": 0.01, "importance_sampling_level": "sequence"}
    return out


# verl's defaults (verl/trainer/config/actor/actor.yaml, policy_loss) for the losses that need them.
_VERL_CONFIG = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
                "policy_loss": {"clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0,
                                "kl_cov_ratio": 0.0002, "ppo_kl_coef": 0.1, "dro_beta": 0.1}}


def verl_fused_cases() -> Dict[str, str]:
    """row name -> verl loss mode, for the losses verl_losses.fused_policy_loss runs in the fused pass."""
    from grpo_fast import verl_losses

    return {f"verl {n} (fused)": n for n in verl_losses.FUSED_LOSSES}


def _verl_case(name: str):
    from grpo_fast import verl_losses

    fn = verl_losses.get_policy_loss_fn(name)
    return lambda logp, ent, x: fn(x["old"], logp, x["adv"].unsqueeze(1).expand_as(logp), x["mask"],
                                   "token-mean", _VERL_CONFIG, None)[0]


def _trl_case(entropy_coef: float, off_policy_threshold):
    """TRL's dapo loss (the reference's per-token terms), minus c·mean(H), with TRL's off-policy mask."""
    from grpo_fast import reference
    from grpo_fast.options import GRPOOptions

    o = GRPOOptions(loss_type="dapo")

    def loss(logp, ent, x):
        mask = x["mask"]
        if off_policy_threshold is not None:  # keep a row if A >= 0 or mean(old - logp) <= δ
            kl = ((x["old"] - logp.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            mask = mask * ((x["adv"] >= 0) | (kl <= off_policy_threshold)).float().unsqueeze(1)
        L, _, _ = reference.per_token_loss(logp, mask, x["adv"], o, old_logp=x["old"])
        out = reference.aggregate(L, mask, "global_token_mean")
        if entropy_coef:
            out = out - entropy_coef * (ent * x["mask"]).sum() / x["mask"].sum()
        return out

    return loss


def primitive_cases() -> Dict[str, Callable]:
    out = {f"verl {n}": _verl_case(n) for n in ("vanilla", "gspo", "geo_mean", "gpg", "cispo", "sapo",
                                                 "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "dro")}
    # the entropy bonus on the primitive: what the TRL drop-in still runs with top_entropy_quantile < 1
    out["TRL entropy bonus (entropy_coef=0.01)"] = _trl_case(0.01, None)
    out["TRL off_policy_mask_threshold=0.5"] = _trl_case(0.0, 0.5)
    return out


def _fused_fn(x, backend: str, kw: dict):
    import grpo_fast

    kw = dict(kw)
    inplace = kw.pop("_inplace", True)
    extra = {}
    if kw.pop("_ref", False):
        extra["ref_logp"] = x["ref"]
    if kw.pop("_isr", False):
        extra["importance_sampling_ratio"] = x["isr"]
    if kw.pop("_rewards", False):
        extra["rewards"] = x["rewards"]
    else:
        extra["advantages"] = x["adv"]

    def run(z):
        loss, _ = grpo_fast.grpo_loss(z, x["ids"], completion_mask=x["mask"], old_logp=x["old"],
                                      inplace=inplace, backend=backend, **extra, **kw)
        loss.backward()

    return run


def _verl_fused_fn(x, backend: str, mode: str):
    from grpo_fast import verl_losses

    def run(z):
        loss, _ = verl_losses.fused_policy_loss(z, x["ids"], x["old"], x["adv"].unsqueeze(1).expand_as(x["old"]),
                                                x["mask"], mode, "token-mean", _VERL_CONFIG, inplace=True,
                                                backend=backend)
        loss.backward()

    return run


def _primitive_fn(x, backend: str, loss_fn):
    import grpo_fast

    def run(z):
        # valid rows only, as a caller with a padded batch runs it: the padding's logits are not read
        logp, ent = grpo_fast.logprobs(z, x["ids"], return_entropy=True, mask=x["mask"], backend=backend)
        loss_fn(logp, ent, x).backward()

    return run


def run(shape: Tuple[int, int, int], dtype: str, backend: str, repeats: int) -> List[dict]:
    B, T, V = shape
    x = _inputs(B, T, V, common.DTYPES[dtype])
    pristine = x["logits"]
    cases = {}
    for name, kw in fused_cases().items():
        cases[name] = ("fused", _fused_fn(x, backend, kw))
    fused_verl = {mode: name for name, mode in verl_fused_cases().items()}
    for name, fn in primitive_cases().items():
        mode = name[len("verl "):] if name.startswith("verl ") else None
        if mode in fused_verl:  # the fused row right above its primitive-path row
            cases[fused_verl[mode]] = ("verl fused", _verl_fused_fn(x, backend, mode))
        cases[name] = ("primitive", _primitive_fn(x, backend, fn))
    work = pristine.clone()

    def setup():
        work.grad = None
        with torch.no_grad():
            work.copy_(pristine)  # restore what an in-place call overwrote (untimed)
        return work.requires_grad_()

    times: Dict[str, List[float]] = {k: [] for k in cases}
    for _, fn in cases.values():  # warm-up: imports, thread pools, first-touch of buffers
        fn(setup())
    for _ in range(repeats):
        for name, (_, fn) in cases.items():
            t = common.time_fn(fn, setup=setup, repeats=1, warmup=0)
            times[name].extend(t.times)
    base = sorted(times["dapo (default)"])[repeats // 2]
    rows = []
    for name, (path, _) in cases.items():
        med = sorted(times[name])[repeats // 2]
        limit = PRIMITIVE_LIMIT if path == "primitive" else FUSED_LIMIT
        rows.append({"path": path, "case": name, "ms": med * 1e3,
                     "spread": (max(times[name]) - min(times[name])) / med if med else 0.0,
                     "vs_default": med / base, "limit": limit,
                     "within": "yes" if med / base <= limit else "NO"})
    return rows


COLUMNS = [("path", "path", ""), ("case", "case", ""), ("ms", "fwd+bwd ms", ".1f"), ("spread", "spread", ".0%"),
           ("vs_default", "vs dapo", lambda v: f"{v:.2f}x"), ("limit", "limit", lambda v: f"{v:.2f}x"),
           ("within", "within", "")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks options", description=__doc__.split("\n\n")[0])
    common.add_shape_args(p, FULL_SHAPE, QUICK_SHAPE)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shape, repeats = common.shape_and_repeats(args, FULL_SHAPE, QUICK_SHAPE)
    rows = run(shape, args.dtype, args.backend, repeats)
    print(f"B,T,V = {shape}, {args.dtype}, backend={args.backend}")
    print(common.format_table(rows, COLUMNS))
    print(f"time: median of {repeats} fwd+bwd runs, cases interleaved; 'vs dapo' = this case / the default "
          f"dapo fused loss in the same run. Fused-pass options: limit {FUSED_LIMIT}x; primitive-path "
          f"options: {PRIMITIVE_LIMIT}x.")
    common.save_rows(args, f"options_{args.backend}_{args.dtype}", {"shape": shape, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
