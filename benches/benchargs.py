"""The command line every script in ``benches/`` shares.

Every script takes ``--quick``: the whole benchmark, end to end and every side
of it (the baselines too, and the ratios printed), at tiny sizes and durations,
so that it finishes in seconds. tests/test_benches.py runs each script that way
with a deadline, so a broken benchmark fails CI at once. Quick figures mean
nothing; the figures come only from full runs by hand.

A script declares its sizes with ``add_size``, each with a full and a quick
value: an option given on the command line always wins, otherwise ``--quick``
picks the quick value. A script exits 0 only if everything it ran worked.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

QUICK_HELP = (
    "tiny sizes and durations: the whole bench, baselines included, in seconds,"
    " to check that it runs (its figures mean nothing); options given explicitly still win"
)


class BenchParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``--quick`` and sizes that have a quick value."""

    def __init__(self, doc: str | None) -> None:
        super().__init__(
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self._sizes: dict[str, tuple[Any, Any]] = {}
        self._choices: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.add_argument("--quick", action="store_true", help=QUICK_HELP)

    def add_size(
        self, flag: str, *, type: Callable[[str], Any], full: Any, quick: Any, help: str
    ) -> None:
        """An option whose default is ``full``, or ``quick`` with ``--quick``."""
        action = self.add_argument(
            flag, type=type, default=None, help=f"{help} (default {full}; --quick: {quick})"
        )
        self._sizes[action.dest] = (full, quick)

    def add_choices(self, flag: str, choices: Sequence[str], *, help: str) -> None:
        """A comma-separated subset of ``choices``, in the order given (default:
        all of them); ``parse`` turns it into a list and refuses other names."""
        action = self.add_argument(
            flag,
            default=",".join(choices),
            help=f"comma-separated {help}, in order (default {','.join(choices)})",
        )
        self._choices[action.dest] = (flag, tuple(choices))

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """``parse_args``, then the sizes not given take their full or quick
        value, and each ``add_choices`` option becomes a list of names."""
        args = self.parse_args(argv)
        for dest, (full, quick) in self._sizes.items():
            if getattr(args, dest) is None:
                setattr(args, dest, quick if args.quick else full)
        for dest, (flag, choices) in self._choices.items():
            given = getattr(args, dest)
            names = [name.strip() for name in given.split(",") if name.strip()]
            if not names or set(names) - set(choices):
                self.error(f"{flag} takes names from {', '.join(choices)}; got {given!r}")
            setattr(args, dest, names)
        return args
