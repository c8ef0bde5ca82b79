"""How a config checks itself: every problem is collected, each naming its
field in backquotes (`batch_size`) with the value, and all are raised as one
ValueError. Library code speaks of fields only; a command line turns the names
into its flags (`deconvnet.cli.config_error`).

    problems = Problems(self)
    problems.check("batch_size", self.batch_size >= 1, "must be >= 1")
    problems.one_of("pad", ("mean", "black"))
    problems.raise_any()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Problems:
    def __init__(self, config: Any):
        self.config = config
        self.found: list[str] = []

    def check(self, name: str, ok: bool, what: str) -> None:
        """Unless `ok`: "`name` what, got <value>"."""
        if not ok:
            self.found.append(f"`{name}` {what}, got {getattr(self.config, name)!r}")

    def one_of(self, name: str, choices: Iterable[Any], none_ok: bool = False) -> None:
        choices = list(choices)
        value = getattr(self.config, name)
        self.check(name, value in choices or (none_ok and value is None),
                   f"must be one of {', '.join(map(str, choices))}")

    def at_least(self, name: str, low: float, none_ok: bool = False) -> None:
        value = getattr(self.config, name)
        self.check(name, (none_ok and value is None) or (value is not None and value >= low),
                   f"must be >= {low}")

    def add(self, message: str) -> None:
        """A problem in words of its own (several fields, a rule): name the fields in backquotes."""
        self.found.append(message)

    def raise_any(self) -> None:
        if self.found:
            raise ValueError("; ".join(self.found))
