"""The TRL drop-in with ``use_liger_kernel=True``, with Liger's kernels really running (liger-kernel 0.8.5).

What the flag does in trl 1.16 + transformers: ``GRPOTrainer.__init__`` sets
``liger_kernel_config["fused_linear_cross_entropy"] = False`` (the one Liger patch that replaces the
model's forward, and with it TRL's fused LM head; asking for it raises), and ``Trainer.train()`` calls
``transformers.integrations.liger.apply_liger_kernel(model, liger_kernel_config)``, which swaps the
model's RMSNorm, SwiGLU MLP and RoPE for Liger's Triton kernels. TRL computes the loss itself, with
every option: trl 1.16 no longer uses Liger's ``LigerFusedLinearGRPOLoss`` (nor its restrictions). The
drop-in keeps the patched layers and computes the loss with grpo_fast's fused-linear loss, inside the
forward it wraps (which the patches leave in place).

Liger's kernels are Triton code: here they run under ``TRITON_INTERPRET=1`` in a child process (the
patches replace module-level classes and functions of transformers' Qwen2, so they must not leak into
the other tests). Triton 3.9's interpreter has two gaps that Liger's kernels hit, filled in the child
only (``_interpreter_shim``): a Python float argument stays a float (compiled Triton passes it as an fp32
scalar; Liger's RMSNorm calls ``eps.to(...)`` on it), and libdevice's ``rsqrt`` (RMSNorm) has no
interpreter implementation (it is ``tl.math.rsqrt``'s). Everything else is Liger's code as released.

The child builds, from one tiny Qwen2 (tests/test_trl.py's, nothing downloaded): TRL's trainer with
use_liger_kernel=True, the drop-in with use_liger_kernel=True and the drop-in without. It runs one step
(``compute_loss`` + backward on a batch in TRL's layout) of the unpatched drop-in first, then applies the
patches to the two Liger trainers exactly as ``Trainer.train()`` does and steps them, counting the calls
of Liger's RMSNorm / SwiGLU / RoPE functions and of grpo_fast's loss. The test then checks:

- drop-in + Liger equals TRL + Liger (loss, every gradient, the metrics) at 1e-5, as tests/test_trl.py
  compares without Liger: the same patched layers under both, so only the loss differs;
- drop-in + Liger is close to the drop-in without Liger: Liger's fp32 kernels reorder the RMSNorm and
  RoPE arithmetic (measured here: every gradient within 1.7e-6 relative, the loss within 7e-7); 1e-4 is
  far above that and far below any real difference (a wrong norm or rotary gives O(1) errors);
- Liger's kernels ran in the patched steps and not in the unpatched one, and grpo_fast's loss ran in each
  drop-in step;
- ``Trainer.train()`` with use_liger_kernel=True (generation, the patches, one optimizer step) logs the
  same loss, grad_norm and metrics as TRL's trainer with the flag (1e-4, as tests/test_trl.py's run).

The configurations include options Liger's own GRPO loss rejects (TRL before 1.16 raised on them with
use_liger_kernel=True): the off-policy mask, the top-entropy quantile and the entropy bonus (and, with
GRPO_FAST_FULL_MATRIX=1, vespo and a sequence-level grpo). Skipped when liger-kernel is not installed
(``pip install 'grpo_fast[liger]'``; scripts/test.sh installs it). Runtime: one child process, about 45 s
of CPU.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from backends_fixture import full_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIGER_VERSION = "0.8.5"  # the release the interpreter shim below was written against (scripts/test.sh installs it)

CASES = {
    "dapo_beta": dict(loss_type="dapo", beta=0.04),
    # On the log-prob primitive: options Liger's fused GRPO loss does not support.
    "off_policy_entropy_options": dict(loss_type="bnpo", off_policy_mask_threshold=0.3, top_entropy_quantile=0.6,
                                       entropy_coef=0.05, beta=0.04),
    # With GRPO_FAST_FULL_MATRIX=1 only (each case is a few seconds of interpreted Triton; the default run keeps
    # one fused-path and one primitive-path case).
    "grpo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, epsilon_high=0.28),
    "vespo": dict(loss_type="vespo", beta=0.04),
}
SLOW_CASES = ("grpo_sequence", "vespo")
LIGER_FUNCTIONS = ("rms_norm", "swiglu", "rope")


# ---- the child process ------------------------------------------------------------------------------


def _interpreter_shim():
    """Fill the two gaps of Triton's interpreter that Liger's kernels hit (see the module docstring)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cvt = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):  # compiled Triton: an fp32 scalar argument
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return cvt(arg)

    interpreter._implicit_cvt = implicit_cvt
    import liger_kernel.ops.rms_norm as rms_norm

    if not hasattr(rms_norm, "rsqrt"):
        raise RuntimeError(f"liger_kernel.ops.rms_norm has no rsqrt: the shim was written for liger-kernel {LIGER_VERSION}")
    rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)  # looked up when called: the interpreter's patched tl.math


def _count_calls(calls):
    """Count the forward calls of Liger's RMSNorm, SwiGLU and RoPE functions and of grpo_fast's losses."""
    import liger_kernel.ops as ops
    import liger_kernel.ops.rope as rope

    import grpo_fast

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, cls in zip(LIGER_FUNCTIONS, (ops.LigerRMSNormFunction, ops.LigerSiLUMulFunction, rope.LigerRopeFunction)):
        cls.forward = staticmethod(counted(name, cls.forward))
    for name in ("fused_linear_grpo_loss", "fused_linear_logprobs"):
        setattr(grpo_fast, name, counted("grpo_fast", getattr(grpo_fast, name)))


def _worker(model_path, out_path, cases, train):
    _interpreter_shim()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trl
    from test_trl import _batch, _build, _step, _tokenizer  # the single-process tests' trainer, batch and step
    from transformers.integrations.liger import apply_liger_kernel

    from grpo_fast.integrations.trl import GRPOTrainer

    calls = dict.fromkeys(LIGER_FUNCTIONS + ("grpo_fast",), 0)
    _count_calls(calls)
    tiny = (model_path, _tokenizer())
    tmp = pathlib.Path(out_path).parent

    def step(trainer, inputs):
        before = dict(calls)
        loss, grads, metrics = _step(trainer, inputs)
        return dict(loss=loss.item(), grads={n: g.tolist() for n, g in grads.items()}, metrics=metrics,
                    calls={k: calls[k] - before[k] for k in calls})

    # Every trainer is built before any patch: the patches replace transformers' Qwen2 classes and RoPE
    # function for the whole process, so the plain drop-in steps first, then the patched ones.
    t0 = time.time()
    built = {}
    for case in cases.split(","):
        config = CASES[case]
        built[case] = dict(
            plain=_build(GRPOTrainer, tiny, tmp, **config),
            trl=_build(trl.GRPOTrainer, tiny, tmp, use_liger_kernel=True, **config),
            ours=_build(GRPOTrainer, tiny, tmp, use_liger_kernel=True, **config),
        )
    print(f"[built {time.time() - t0:.1f}s]", file=sys.stderr)
    res = {}
    for case, trainers in built.items():
        inputs = _batch(trainers["plain"])
        res[case] = dict(plain=step(trainers["plain"], inputs), inputs=inputs)
    for case, trainers in built.items():
        inputs = res[case].pop("inputs")
        for impl in ("trl", "ours"):
            tr = trainers[impl]
            apply_liger_kernel(tr.model, tr.args.liger_kernel_config)  # what Trainer.train() does
            res[case][impl] = step(tr, inputs)
            print(f"[{case} {impl} {time.time() - t0:.1f}s]", file=sys.stderr)

    # Trainer.train(): TRL generates (through the patched layers), applies the patches itself, one step.
    train_config = dict(loss_type="grpo", beta=0.04, max_steps=1, learning_rate=1e-2, per_device_train_batch_size=3,
                        num_generations=3, seed=7, max_completion_length=4, use_liger_kernel=True)
    res["train"] = {}
    for impl, cls in (("trl", trl.GRPOTrainer), ("ours", GRPOTrainer)) if train == "train" else ():
        tr = _build(cls, tiny, tmp, **train_config)
        before = dict(calls)
        tr.train()
        res["train"][impl] = dict(logs=[h for h in tr.state.log_history if "loss" in h],
                                  calls={k: calls[k] - before[k] for k in calls})
        print(f"[train {impl} {time.time() - t0:.1f}s]", file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump(res, f)


# ---- the test ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liger_run(tmp_path_factory):
    """{case: results, "train": results}: one child process per group of cases (the fast ones with the
    training run; the slow ones alone, when a slow test asks for them)."""
    cache = {}

    def get(case):
        group = "slow" if case in SLOW_CASES else "fast"
        if group not in cache:
            cases = SLOW_CASES if group == "slow" else tuple(c for c in CASES if c not in SLOW_CASES)
            cache[group] = _launch(tmp_path_factory, cases, train=group == "fast")
        return cache[group][case]

    return get


def _launch(tmp_path_factory, cases, train):
    pytest.importorskip("trl", reason="the TRL integration needs trl: pip install 'grpo_fast[trl]'")
    pytest.importorskip("datasets", reason="TRL's trainer needs datasets")
    pytest.importorskip("triton", reason="Liger's kernels are Triton code (run here by Triton's interpreter)")
    pytest.importorskip("liger_kernel", reason="use_liger_kernel=True needs liger-kernel: pip install 'grpo_fast[liger]'")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trl import _SMALL, _save
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("trl_liger")
    path, _ = _save(tmp / "model", Qwen2Config(**_SMALL, tie_word_embeddings=False), Qwen2ForCausalLM)
    out = str(tmp / "res.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, out, ",".join(cases), "train" if train else "-"]
    proc = subprocess.run(cmd, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


def _rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check_same(ours, ref, what, rtol):
    assert math.isfinite(ref["loss"]) and math.isclose(ours["loss"], ref["loss"], rel_tol=rtol, abs_tol=1e-6), \
        f"{what} loss: {ours['loss']} vs {ref['loss']}"
    assert set(ours["grads"]) == set(ref["grads"]), what
    for name in ref["grads"]:
        err = _rel(ours["grads"][name], ref["grads"][name])
        assert err <= rtol, f"{what}: gradient of {name} relative error {err:.3g} > {rtol}"
    # Every metric either logs, under TRL's names; only TRL's per-sequence extremes are not logged by the drop-in.
    names = set(ref["metrics"]) - {"clip_ratio/low_min", "clip_ratio/high_max"}
    assert "entropy" in names and set(ours["metrics"]) == names, f"{what}: metrics {sorted(ours['metrics'])} vs {sorted(names)}"
    for name in names:
        value = ref["metrics"][name]
        assert math.isclose(ours["metrics"][name], value, rel_tol=rtol, abs_tol=1e-6), \
            f"{what}: metric {name} {ours['metrics'][name]} vs {value}"


_SKIP_SLOW = pytest.mark.skipif(not full_matrix(), reason="interpreted Liger kernels are slow: GRPO_FAST_FULL_MATRIX=1 runs it")
CASE_PARAMS = [pytest.param(c, marks=_SKIP_SLOW) if c in SLOW_CASES else c for c in CASES]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_liger_step_matches_trl_with_liger(liger_run, case):
    res = liger_run(case)
    _check_same(res["ours"], res["trl"], f"{case}: drop-in + Liger vs TRL + Liger", rtol=1e-5)
    for impl in ("trl", "ours"):
        assert all(res[impl]["calls"][f] > 0 for f in LIGER_FUNCTIONS), f"{impl}: Liger's kernels did not run {res[impl]['calls']}"
    assert res["ours"]["calls"]["grpo_fast"] == 1 and res["trl"]["calls"]["grpo_fast"] == 0


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_liger_step_close_to_drop_in_without_liger(liger_run, case):
    res = liger_run(case)
    _check_same(res["ours"], res["plain"], f"{case}: drop-in + Liger vs drop-in", rtol=1e-4)
    assert all(res["plain"]["calls"][f] == 0 for f in LIGER_FUNCTIONS) and res["plain"]["calls"]["grpo_fast"] == 1
    # Liger's kernels really changed the arithmetic (a patch that did nothing would give identical gradients).
    assert any(_rel(res["ours"]["grads"][n], res["plain"]["grads"][n]) > 0 for n in res["plain"]["grads"])


def test_liger_training_run_matches_trl(liger_run):
    """Trainer.train() applies the patches, generates through them and takes one optimizer step: the drop-in
    logs what TRL logs (1e-4: sampled completions, then an fp32 step)."""
    ref, ours = liger_run("train")["trl"], liger_run("train")["ours"]
    assert len(ref["logs"]) == len(ours["logs"]) == 1
    for key in ("loss", "grad_norm", "entropy", "kl", "clip_ratio/region_mean", "reward"):
        assert key in ours["logs"][0], f"{key} not logged by the drop-in"
        a, b = ours["logs"][0][key], ref["logs"][0][key]
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), f"{key}: trl {b} grpo_fast {a}"
    assert ref["logs"][0]["grad_norm"] > 0
    for impl in (ref, ours):
        assert all(impl["calls"][f] > 0 for f in LIGER_FUNCTIONS), impl["calls"]
    assert ours["calls"]["grpo_fast"] > 0 and ref["calls"]["grpo_fast"] == 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(*sys.argv[2:6])
