"""grpo_fast inside OpenRLHF 0.11.2: the actor's log-probs and entropy through grpo_fast.logprobs.

OpenRLHF imports deepspeed, peft and flash_attn at module level. scripts/test.sh installs OpenRLHF
0.11.2 and deepspeed/peft without their dependencies into ``.test_deps/openrlhf`` (kept out of the
test process: importing deepspeed changes what other libraries import), and
``tests/stubs/flash_attn`` stands in for flash-attn (CUDA only), whose functions OpenRLHF calls only
for packed samples. The OpenRLHF parts run in child processes with that path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".test_deps" / "openrlhf"
STUBS = ROOT / "tests" / "stubs"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(DEPS), str(STUBS), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _importable() -> str | None:
    """None when OpenRLHF imports in a child with the test path, else why not."""
    if not DEPS.is_dir():
        return f"OpenRLHF is not installed in {DEPS} (scripts/test.sh installs it)"
    r = subprocess.run([sys.executable, "-c", "import openrlhf.models.actor, openrlhf.models.loss"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    return None if r.returncode == 0 else f"OpenRLHF does not import: {r.stderr.strip().splitlines()[-1:]}"


@pytest.fixture(scope="module")
def openrlhf_env():
    why = _importable()
    if why is not None:
        pytest.skip(why)
    return _env()


def test_actor_step_matches_openrlhf(openrlhf_env, tmp_path):
    """One actor update (OpenRLHF's Actor.forward with entropy, its PolicyLoss with dual clip, k3 KL
    loss, entropy bonus, backward) with grpo_fast enabled vs OpenRLHF as shipped: every value and
    parameter gradient is as close to float64 as OpenRLHF's own fp32 path is."""
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "openrlhf_step.py"), str(out)], env=openrlhf_env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    base, fast = res["openrlhf"], res["grpo_fast"]
    assert res["values"]["clip_ratio"] > 0  # the clip and the entropy/KL terms are all in play
    for key in ("loss", "actor_loss", "clip_ratio", "ppo_kl", "kl_loss", "entropy_loss", "logp", "entropy", "grad"):
        # fp32 noise floor: OpenRLHF's own error vs float64, or a few fp32 ulps of the value
        assert fast[key] <= 4 * base[key] + 2e-6, (key, fast[key], base[key], fast.get("grad_worst"))


def test_ray_workers_get_the_patch(openrlhf_env, tmp_path):
    """ray_runtime_env(): a Ray worker started under it runs enable() before any task."""
    code = (
        "import ray, grpo_fast.integrations.openrlhf as gf\n"
        "ray.init(num_cpus=1, include_dashboard=False, runtime_env=gf.ray_runtime_env())\n"
        "@ray.remote\n"
        "def probe():\n"
        "    import openrlhf.models.actor as a, grpo_fast.integrations.openrlhf as gf\n"
        "    return gf.enabled(), a.log_probs_from_logits.__module__\n"
        "print(ray.get(probe.remote()))\n"
        "ray.shutdown()\n"
    )
    env = dict(openrlhf_env, RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(True, 'grpo_fast.integrations.openrlhf')" in r.stdout, r.stdout[-2000:]


def test_version_outside_tested_range_is_refused():
    from grpo_fast.integrations import openrlhf as gf

    assert gf.check_version("0.11.2") == "0.11.2"
    for bad in ("0.10.9", "0.12.0", "1.0"):
        with pytest.raises(RuntimeError, match=f"OpenRLHF {bad} is outside the tested range"):
            gf.check_version(bad)


def test_runtime_env_keeps_other_settings_and_refuses_a_second_hook():
    from grpo_fast.integrations import openrlhf as gf

    env = gf.ray_runtime_env({"env_vars": {"A": "1"}})
    assert env == {"env_vars": {"A": "1"}, "worker_process_setup_hook": "grpo_fast.integrations.openrlhf.enable"}
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        gf.ray_runtime_env({"worker_process_setup_hook": "mine.setup"})


def test_launcher_gives_openrlhfs_ray_init_the_hook(monkeypatch):
    """python -m grpo_fast.integrations.openrlhf ARGS: OpenRLHF's launcher runs with ARGS and its own
    ray.init(runtime_env=...) gets the setup hook added (recorded here instead of starting Ray)."""
    import runpy

    import ray

    from grpo_fast.integrations import openrlhf as gf

    calls = {}
    monkeypatch.setattr(gf, "check_version", lambda version=None: "0.11.2")
    monkeypatch.setattr(gf, "enable", lambda backend="auto": calls.setdefault("enabled", True))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, runtime_env=None, **k: calls.setdefault("runtime_env", runtime_env))

    def fake_launcher(name, run_name, alter_sys):  # what openrlhf.cli.train_ppo_ray's __main__ does first
        calls["module"], calls["argv"] = name, list(sys.argv)
        ray.init(runtime_env={"env_vars": {"NCCL_DEBUG": "WARN"}})

    monkeypatch.setattr(runpy, "run_module", fake_launcher)
    monkeypatch.setattr(sys, "argv", ["x"])
    assert gf.main(["--pretrain", "m"]) == 0
    assert calls["module"] == "openrlhf.cli.train_ppo_ray" and calls["argv"][1:] == ["--pretrain", "m"]
    assert calls["enabled"] is True
    assert calls["runtime_env"] == {"env_vars": {"NCCL_DEBUG": "WARN"},
                                    "worker_process_setup_hook": "grpo_fast.integrations.openrlhf.enable"}
