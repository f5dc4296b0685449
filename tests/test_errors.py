"""One error type: S2LError carries a fix; the CLI prints it as one message, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s2l_ray.config import ConfigError
from s2l_ray.errors import ParamError, S2LError, config_keys
from s2l_ray.io.storage import StorageError
from s2l_ray.stages.ingest import IngestError
from s2l_ray.stages.trajectories import TrajectoryError


def test_every_user_error_is_an_s2l_error_with_a_fix() -> None:
    for cls in (ConfigError, IngestError, TrajectoryError, StorageError):
        e = cls("config key 'x.y': is 3. Fix: use 2")
        assert isinstance(e, S2LError) and e.fix == "use 2"
        assert str(e) == "config key 'x.y': is 3. Fix: use 2"  # the message is unchanged
    assert isinstance(ConfigError("a"), ValueError)  # config code may still catch ValueError
    assert str(S2LError("it broke", fix="do this")) == "it broke. Fix: do this"


def test_errors_survive_pickling() -> None:  # Ray ships them from tasks and actors
    import pickle

    p = pickle.loads(pickle.dumps(ParamError("k", "9 > 3", "lower `k`")))
    assert (p.param, p.problem, p.fix) == ("k", "9 > 3", "lower `k`")
    for e in (ConfigError("config key 'a': b", fix="c"), TrajectoryError("x. Fix: y")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.fix == e.fix


def test_config_keys_passes_other_errors_through() -> None:
    with pytest.raises(KeyError), config_keys("cluster"):
        raise KeyError("a bug, not the user's")
    with pytest.raises(ValueError, match="plain") as e, config_keys("cluster"):
        raise ValueError("plain")
    assert not isinstance(e.value, S2LError)
    with pytest.raises(S2LError, match="rerun it"), config_keys("cluster"):
        raise ValueError("losses are NaN. Fix: rerun it")
    with pytest.raises(ConfigError, match="^config key 'cluster.k': 9 > 3. Fix: lower "
                       "cluster.k$"), config_keys("cluster"):
        raise ParamError("k", "9 > 3", "lower `k`")


def test_cli_prints_one_message_exit_2_no_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "s2l_ray", "config", "demo", "cluster.k=0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cluster.k" in r.stderr and "Fix:" in r.stderr
    assert len([line for line in r.stderr.splitlines() if "ERROR" in line]) == 1
