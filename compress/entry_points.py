"""A registry of what plugins provide, found through one entry-point group and never named in code.

Three kinds of thing are registered this way: methods (``compress.plugins``: how weights are decided, see
:mod:`compress.registry`), formats (``compress.formats``: how weights are stored and run) and runtime features
(``compress.runtime``: how a loaded model runs). Built-ins are declared in compress's own ``pyproject.toml``
exactly as a third party declares its own.

Discovery is lazy (nothing is imported until an entry is asked for or listed), an entry that fails to import is
remembered with its error and reported when asked for, and an unknown name gets a "did you mean" and the list of
what is installed.
"""

from __future__ import annotations

import difflib
import logging
import traceback
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from compress.errors import PluginError

log = logging.getLogger(__name__)

T = TypeVar("T")


def distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


class EntryPointRegistry(Generic[T]):
    """Entries by name, loaded on first use from one entry-point group (plus any registered in code).

    ``noun`` names an entry in messages ("method", "format"); ``load`` turns what an entry point gives into an
    entry, raising PluginError when it is not one; ``name_of`` reads an entry's own name, which must be the
    entry point's.
    """

    def __init__(self, group: str, noun: str, load: Callable[[object, str], T], name_of: Callable[[T], str],
                 listing: str):
        self.group = group
        self.noun = noun
        self._load = load
        self._name_of = name_of
        self._listing = listing  # where a user sees what is installed
        self._entry_points: dict[str, list[EntryPoint]] | None = None
        self._entries: dict[str, T] = {}
        self._in_code: set[str] = set()
        self._failures: dict[str, str] = {}

    def _discover(self) -> dict[str, list[EntryPoint]]:
        if self._entry_points is None:
            found: dict[str, list[EntryPoint]] = {}
            for ep in entry_points(group=self.group):
                found.setdefault(ep.name, []).append(ep)
            self._entry_points = found
        return self._entry_points

    def refresh(self) -> None:
        """Forget what was discovered (after installing a plugin in a running process)."""
        self._entry_points = None
        self._failures.clear()
        self._entries = {n: e for n, e in self._entries.items() if n in self._in_code}

    def register(self, obj: object) -> T:
        """Register an entry from code (notebooks, tests; the last one registered under a name wins); entry points
        are the way for packages."""
        entry = self._load(obj, "register()")
        name = self._name_of(entry)
        self._entries[name] = entry
        self._in_code.add(name)
        return entry

    def unregister(self, name: str) -> None:
        """Forget an entry registered from code (entry points are found again on the next lookup)."""
        self._entries.pop(name, None)
        self._in_code.discard(name)

    def names(self) -> list[str]:
        return sorted(set(self._discover()) | set(self._entries))

    def declared_by(self, name: str) -> str:
        """The distribution that declares ``name`` ("registered in code" for entries registered from code)."""
        eps = self._discover().get(name)
        return distribution_name(eps[0]) if eps and name not in self._in_code else "registered in code"

    def get(self, name: str) -> T:
        """The entry called ``name``, importing its plugin if needed; PluginError says why not."""
        if name in self._entries:
            return self._entries[name]
        candidates = self._discover().get(name)
        if not candidates:
            raise PluginError(self.unknown_message(name))
        if len(candidates) > 1:
            owners = ", ".join(f"{distribution_name(ep)} ({ep.value})" for ep in candidates)
            raise PluginError(f"{self.noun} {name!r} is declared by more than one installed package: {owners}; "
                              "uninstall all but one")
        ep = candidates[0]
        if name in self._failures:
            raise PluginError(self._failures[name])
        try:
            entry = self._load(ep.load(), f"entry point {ep.value!r}")
        except Exception as exc:  # a broken third-party plugin must not take the others down
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._failures[name] = (
                f"{self.noun} {name!r} is installed ({distribution_name(ep)}, entry point {ep.value!r}) "
                f"but failed to import: {detail}; fix or reinstall that package"
            )
            log.debug("%s %s failed to load", self.noun, name, exc_info=True)
            raise PluginError(self._failures[name]) from exc
        if self._name_of(entry) != name:
            raise PluginError(f"entry point {name!r} ({ep.value}) loads a {self.noun} named "
                              f"{self._name_of(entry)!r}; the entry-point name and the {self.noun}'s name must agree")
        self._entries[name] = entry
        return entry

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        installed = ", ".join(known) if known else "none"
        return f"unknown {self.noun} {name!r}; {hint}installed {self.noun}s: {installed} ({self._listing})"
