"""s2l_ray.core.schedule: the step plan and where the T checkpoints fall (pure, ms)."""

from __future__ import annotations

import itertools
import math

import pytest

from s2l_ray.config import ConfigError
from s2l_ray.core.schedule import TrainPlan, even_checkpoints, lr_at, make_plan
from s2l_ray.errors import ParamError, config_keys


def plan(n=300, world=2, batch=8, accum=1, epochs=2, max_steps=None, ckpts=4, steps=None,
         train_steps=None) -> TrainPlan:
    return make_plan(n, world, batch, accum, epochs, max_steps, ckpts, steps, train_steps)


def test_steps_per_epoch_drop_the_partial_step() -> None:
    p = plan(n=300, world=2, batch=8, accum=2)  # 150 per worker -> 19 micro -> 9 steps
    assert (p.micro_per_epoch, p.steps_per_epoch, p.total_steps) == (19, 9, 18)
    assert p.epoch_of(9) == 0 and p.epoch_of(10) == 1 and p.epoch_of(18) == 1
    assert TrainPlan(**p.as_dict()) == p


def test_checkpoints_are_even_and_end_at_the_last_step() -> None:
    assert even_checkpoints(18, 4) == (4, 9, 14, 18)
    assert even_checkpoints(5, 5) == (1, 2, 3, 4, 5)
    p = plan(ckpts=4)
    assert p.checkpoint_steps == even_checkpoints(p.total_steps, 4)
    assert p.checkpoint_steps[-1] == p.total_steps


def test_max_steps_and_train_steps_cut_training() -> None:
    assert plan(max_steps=7, ckpts=2).total_steps == 7
    p = plan(n=100, world=1, batch=10, epochs=1, train_steps=25, ckpts=5)  # 10 steps/epoch
    assert (p.epochs, p.total_steps, p.checkpoint_steps) == (3, 25, (5, 10, 15, 20, 25))


def test_explicit_checkpoint_steps_are_kept() -> None:
    assert plan(steps=[1, 5, 18]).checkpoint_steps == (1, 5, 18)


@pytest.mark.parametrize(("kwargs", "param", "key"), [
    ({"n": 10, "world": 2, "batch": 8}, "batch_size", "reference.batch_size"),
    ({"ckpts": 100}, "num_checkpoints", "reference.num_checkpoints"),
    ({"steps": [1, 999]}, "checkpoint_steps", "reference.checkpoint_steps")])
def test_impossible_plans_name_the_argument_then_the_key(kwargs, param: str, key: str) -> None:
    with pytest.raises(ParamError, match=rf"^{param}: .*Fix") as e:
        plan(**kwargs)
    assert "reference." not in str(e.value)  # Ray-free: no config key names
    with pytest.raises(ConfigError, match=rf"'{key}'.*Fix") as e, config_keys("reference"):
        plan(**kwargs)
    assert "`" not in str(e.value)  # every argument in the fix became its key


def test_batch_fix_names_every_key_involved() -> None:
    with pytest.raises(ConfigError) as e, config_keys("target"):
        plan(n=10, world=2, batch=8)
    assert e.value.fix == "lower target.batch_size, target.grad_accum or target.num_workers"


def test_lr_warms_up_then_decays_to_zero() -> None:
    total, peak = 100, 1e-3
    lrs = [lr_at(s, total, peak, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # monotone after warm-up
    assert lr_at(total, total, peak, 0.1) == pytest.approx(0.0, abs=1e-12)
    mid = 10 + (total - 10) // 2
    assert lrs[mid] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
