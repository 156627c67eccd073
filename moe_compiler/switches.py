"""The package's on / off environment switches, parsed one way: '1' or '0', anything else a clear error."""

from __future__ import annotations

import contextlib
import contextvars
import os


def env_switch(name: str, default: str, on: str, off: str) -> bool:
    """os.environ[name] (default `default`) as a bool; `on` / `off` say what '1' / '0' mean in the error."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected '1' ({on}) or '0' ({off})")
    return value == "1"


class OptionSwitch:
    """An on / off setting that is also a backend option: the option while a compile runs (`option(enabled)`
    around it), else the environment switch (env_switch)."""

    def __init__(self, name: str, default: str, on: str, off: str):
        self.name, self.default, self.on, self.off = name, default, on, off
        self._option: contextvars.ContextVar[bool | None] = contextvars.ContextVar(name, default=None)

    def __call__(self) -> bool:
        option = self._option.get()
        if option is not None:
            return option
        return env_switch(self.name, self.default, self.on, self.off)

    @contextlib.contextmanager
    def option(self, enabled: bool):
        token = self._option.set(enabled)
        try:
            yield
        finally:
            self._option.reset(token)
