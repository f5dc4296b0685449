"""One error type for every failure the user can fix, and the bridge from Ray-free code to it.

    S2LError(message, fix=...)   what went wrong and what to do; the CLI prints it as one
                                 message (exit code 2, no traceback). ConfigError, IngestError,
                                 TrajectoryError and StorageError are S2LErrors.
    ParamError(param, problem, fix)
                                 what Ray-free code (s2l_ray.core) raises for a bad argument: a
                                 ValueError naming the argument, not a config key
    config_keys(section, ...)    the stage adapters' context manager: a ParamError (or another
                                 ValueError/TypeError) from the code inside becomes a
                                 ConfigError naming `section.<param>`

This module imports nothing of s2l_ray, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping


class S2LError(Exception):
    """A failure the user can fix. `fix` says how (also parsed from a message "... Fix: ...")."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        if fix is None and "Fix: " in message:
            message, _, fix = message.partition("Fix: ")
            message = message.rstrip()
            if message.endswith("."):
                message = message[:-1]
        self.message, self.fix = message, fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message}. Fix: {self.fix}" if self.fix else self.message


class ParamError(ValueError):
    """A bad argument of a Ray-free function: `param` is the argument's name (the same as the
    config field it usually comes from); `fix` names arguments in backticks (`grad_accum`), which
    `config_keys` turns into config keys."""

    def __init__(self, param: str, problem: str, fix: str) -> None:
        self.param, self.problem, self.fix = param, problem, fix
        super().__init__(f"{param}: {problem}. Fix: {fix}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.param, self.problem, self.fix)  # crosses Ray (pickle) whole


def _cause(e: BaseException) -> BaseException:
    """The exception raised in a Ray task or actor, when `e` is Ray's wrapper of it."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


@contextlib.contextmanager
def config_keys(section: str, params: Mapping[str, str] | None = None) -> Iterator[None]:
    """The stage adapters' bridge from Ray-free code: a ParamError raised inside (here or in a
    Ray task) becomes a ConfigError naming the config key `section.param` (or `params[param]`,
    a full key, when the argument is named otherwise than its field), with the `names` in
    backticks in its fix qualified the same way. A ValueError/TypeError whose message carries
    a "Fix:" becomes an S2LError; S2LErrors and every other exception pass through."""
    from s2l_ray.config import ConfigError

    keys = dict(params or {})

    def key(name: str) -> str:
        return keys.get(name, f"{section}.{name}")

    try:
        yield
    except S2LError:
        raise
    except (ValueError, TypeError) as e:
        cause = _cause(e)
        if isinstance(cause, ParamError):
            fix = re.sub(r"`(\w+)`", lambda m: key(m.group(1)), cause.fix)
            raise ConfigError(f"config key '{key(cause.param)}': {cause.problem}",
                              fix=fix) from e
        if isinstance(cause, S2LError):
            raise cause from e
        if "Fix: " in str(cause):
            raise S2LError(str(cause)) from e
        raise
