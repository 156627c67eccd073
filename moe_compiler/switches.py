"""The package's on / off environment switches, parsed one way: '1' or '0', anything else a clear error."""

from __future__ import annotations

import os


def env_switch(name: str, default: str, on: str, off: str) -> bool:
    """os.environ[name] (default `default`) as a bool; `on` / `off` say what '1' / '0' mean in the error."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected '1' ({on}) or '0' ({off})")
    return value == "1"
