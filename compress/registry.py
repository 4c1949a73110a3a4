"""Plugin registry: methods are found through the ``compress.plugins`` entry-point group, never named here.

Discovery is lazy (nothing is imported until a method is asked for or listed), a plugin that fails to
import is remembered with its error and reported when a recipe asks for it, and an unknown name gets a
"did you mean" and the list of what is installed.
"""

from __future__ import annotations

import difflib
import logging
import traceback
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from compress.errors import PluginError
from compress.methods import Method, MethodConfig, Needs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "compress.plugins"


@dataclass(frozen=True)
class PluginInfo:
    """What ``compress plugins`` shows for one method."""

    name: str
    distribution: str
    needs: str
    summary: str
    error: str | None = None


def _distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


class Registry:
    """Methods by name, loaded on first use from entry points (plus any registered in code)."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        self.group = group
        self._entry_points: dict[str, list[EntryPoint]] | None = None
        self._methods: dict[str, Method] = {}
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
        self._methods = {n: m for n, m in self._methods.items() if getattr(m, "_registered_in_code", False)}

    def register(self, method: type[Method] | Method) -> Method:
        """Register a method from code (notebooks, tests); entry points are the way for packages."""
        instance = _instantiate(method, origin="register()")
        instance._registered_in_code = True  # type: ignore[attr-defined]
        self._methods[instance.name] = instance
        return instance

    def names(self) -> list[str]:
        return sorted(set(self._discover()) | set(self._methods))

    def get(self, name: str) -> Method:
        """The method called ``name``, importing its plugin if needed; PluginError says why not."""
        if name in self._methods:
            return self._methods[name]
        candidates = self._discover().get(name)
        if not candidates:
            raise PluginError(_unknown_message(name, self.names()))
        if len(candidates) > 1:
            owners = ", ".join(f"{_distribution_name(ep)} ({ep.value})" for ep in candidates)
            raise PluginError(
                f"method {name!r} is declared by more than one installed package: {owners}; "
                "uninstall all but one"
            )
        ep = candidates[0]
        if name in self._failures:
            raise PluginError(self._failures[name])
        try:
            loaded = ep.load()
            method = _instantiate(loaded, origin=f"entry point {ep.value!r}")
        except Exception as exc:  # a broken third-party plugin must not take the others down
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._failures[name] = (
                f"method {name!r} is installed ({_distribution_name(ep)}, entry point {ep.value!r}) "
                f"but failed to import: {detail}; fix or reinstall that package"
            )
            log.debug("plugin %s failed to load", name, exc_info=True)
            raise PluginError(self._failures[name]) from exc
        if method.name != name:
            raise PluginError(
                f"entry point {name!r} ({ep.value}) loads a method named {method.name!r}; "
                "the entry-point name and Method.name must agree"
            )
        self._methods[name] = method
        return method

    def describe(self) -> list[PluginInfo]:
        """Every discovered method, importing each (for ``compress plugins``)."""
        infos = []
        eps = self._discover()
        for name in self.names():
            dist = _distribution_name(eps[name][0]) if name in eps else "registered in code"
            try:
                method = self.get(name)
            except PluginError as exc:
                infos.append(PluginInfo(name, dist, "?", "", error=str(exc)))
                continue
            infos.append(PluginInfo(name, dist, method.needs.value, method.summary))
        return infos


def _instantiate(obj: object, origin: str) -> Method:
    method = obj() if isinstance(obj, type) else obj
    if not isinstance(method, Method):
        raise PluginError(f"{origin} gives {obj!r}, which is not a compress.Method subclass or instance")
    for attr in ("name", "Config"):
        if not hasattr(method, attr):
            raise PluginError(f"{origin}: method class {type(method).__name__} does not set {attr!r}")
    if not (isinstance(method.Config, type) and issubclass(method.Config, MethodConfig)):
        raise PluginError(f"{origin}: {type(method).__name__}.Config must subclass compress.MethodConfig")
    if not isinstance(method.needs, Needs):
        raise PluginError(f"{origin}: {type(method).__name__}.needs must be a compress.Needs value")
    return method


def _unknown_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    installed = ", ".join(known) if known else "none"
    return f"unknown method {name!r}; {hint}installed methods: {installed} (see `compress plugins`)"


registry = Registry()
