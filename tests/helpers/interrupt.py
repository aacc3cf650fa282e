"""Stopping a run at a chosen point, for the resume tests."""

from typing import Any


def interrupt_on_call(owner: Any, name: str, call: int) -> None:
    """Replace `owner.<name>` by a wrapper that raises KeyboardInterrupt on its `call`-th call (1-based) and
    passes every other call through, as a user's Ctrl-C at that point of training would."""
    original, calls = getattr(owner, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated stop")
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
