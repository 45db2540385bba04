"""The option record (grpo_fast.GRPOOptions) and the table of loss types (_config.LOSS_TABLE):
every option reaches the kernels by name, every entry point lists and checks the same options, and
the table is what the code asks about a loss type."""
import dataclasses
import inspect
import pathlib
import re

import pytest
import torch

import grpo_fast
from grpo_fast._config import CLIP_FAMILY, KL_ESTIMATORS, LEVELS, LOSS_BY_CODE, LOSS_TABLE, LOSS_TYPES, SCALE_REWARDS, metric_names
from grpo_fast.options import OPTION_NAMES, GRPOOptions
from grpo_fast.reference import grpo_loss_reference
from grpo_fast.validation import validate_loss_args

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_option_reaches_the_kernel_config_by_name():
    # Values unlike every default, so that a field read under another option's name shows.
    opts = GRPOOptions(loss_type="grpo", importance_sampling_level="sequence", beta=0.3, kl_estimator="k2",
                       epsilon_low=0.15, epsilon_high=0.25, delta=2.5, temperature=0.7, scale_rewards="batch",
                       adv_eps=1e-3, group_size=2, max_completion_length=9, sapo_temperature_pos=0.9,
                       sapo_temperature_neg=1.2, use_bias_correction_kl=True)
    B, T, V = 4, 3, 5
    inp = validate_loss_args(torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long), rewards=torch.rand(B),
                             ref_logp=torch.zeros(B, T), options=opts)
    c = inp.cfg
    assert (c.loss_type, c.level, c.kl_estimator, c.scale_rewards) == (
        LOSS_TYPES["grpo"], LEVELS["sequence"], KL_ESTIMATORS["k2"], SCALE_REWARDS["batch"])
    assert (c.beta, c.eps_low, c.eps_high, c.delta, c.temperature, c.adv_eps) == (0.3, 0.15, 0.25, 2.5, 0.7, 1e-3)
    assert (c.group_size, c.max_completion_length, c.sapo_temp_pos, c.sapo_temp_neg) == (2, 9.0, 0.9, 1.2)
    assert c.has_delta and c.bias_correction_kl
    assert inp.options == opts  # already numbers of the right type: carried unchanged


def test_epsilon_high_none_resolves_to_epsilon_low():
    inp = validate_loss_args(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.randn(2),
                             options=GRPOOptions(epsilon_low=0.1))
    assert inp.cfg.eps_high == 0.1 and inp.options.epsilon_high == 0.1


@pytest.mark.parametrize("fn", [grpo_fast.grpo_loss, grpo_fast.fused_linear_grpo_loss], ids=lambda f: f.__name__)
def test_public_signatures_and_docs_list_every_option(fn):
    params = inspect.signature(fn).parameters
    for f in dataclasses.fields(GRPOOptions):
        assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert f"{f.name}" in fn.__doc__, f"{fn.__name__}'s docstring does not document {f.name}"


def test_unknown_options_are_named_by_every_entry_point():
    z, y = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match=r"grpo_loss\(\) got unexpected keyword arguments \['epsilon'\]"):
        grpo_fast.grpo_loss(z, y, torch.randn(2), epsilon=0.2)
    with pytest.raises(TypeError, match=r"fused_linear_grpo_loss\(\).*\['loss'\]"):
        grpo_fast.fused_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(5, 4), y, torch.randn(2), loss="dapo")
    with pytest.raises(TypeError, match=r"grpo_loss_reference\(\).*\['betta'\]"):
        grpo_loss_reference(z, y, torch.randn(2), betta=0.1)
    with pytest.raises(TypeError, match="unknown options"):
        grpo_fast.GRPOLoss(temprature=1.0)


def test_the_loss_table_is_consistent():
    codes = sorted(t.code for t in LOSS_TABLE.values())
    assert codes == list(range(len(codes))), "kernel codes are 0..n-1"
    assert LOSS_TYPES == {n: t.code for n, t in LOSS_TABLE.items()}
    assert all(LOSS_BY_CODE[t.code] is t for t in LOSS_TABLE.values())
    assert CLIP_FAMILY == tuple(n for n, t in LOSS_TABLE.items() if t.family == "clip")
    for name, t in LOSS_TABLE.items():
        assert t.name == name
        assert t.family in ("clip", "is_weight", "soft_gate")
        assert t.aggregation in ("row_mean", "batch_token_mean", "fixed_length", "global_token_mean", "row_sum_mean")
        assert metric_names(name, 0.0) == ["entropy", *t.flag_metrics]
        assert metric_names(name, 0.1) == ["entropy", "kl", *t.flag_metrics]


@pytest.mark.parametrize("name", list(LOSS_TABLE))
def test_the_table_decides_what_the_loss_returns(name):
    """The metrics the reference returns and num_items_in_batch's effect follow the table's row."""
    t = LOSS_TABLE[name]
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 6, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (4, 6), generator=g)
    kw = dict(advantages=torch.randn(4, generator=g, dtype=torch.float64), loss_type=name,
              old_logp=torch.randn(4, 6, generator=g, dtype=torch.float64) - 2.0)
    loss, met = grpo_loss_reference(z, y, **kw)
    assert list(met) == metric_names(name, 0.0)
    loss_n, _ = grpo_loss_reference(z, y, num_items_in_batch=100, **kw)
    if t.uses_num_items:
        torch.testing.assert_close(loss_n, loss * 24 / 100)
    else:
        torch.testing.assert_close(loss_n, loss)


def test_loss_type_names_are_spelled_in_few_files():
    """Membership tests read the table: a loss type's name as a string literal stands only in the
    table, the option record and the places that must name one (at most 3 files of the package)."""
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(LOSS_TABLE))
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "grpo_fast").rglob("*.py")
                   if pattern.search(p.read_text()))
    assert len(files) <= 3, files
    assert OPTION_NAMES  # the record is not empty
