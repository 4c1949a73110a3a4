"""The method registry: methods are found through the ``compress.plugins`` entry-point group, never named here
(see :mod:`compress.entry_points`)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.entry_points import EntryPointRegistry
from compress.errors import PluginError
from compress.methods import Method, MethodConfig, Needs

ENTRY_POINT_GROUP = "compress.plugins"


@dataclass(frozen=True)
class PluginInfo:
    """What ``compress plugins`` shows for one method."""

    name: str
    distribution: str
    needs: str
    summary: str
    error: str | None = None


class Registry(EntryPointRegistry[Method]):
    """Methods by name (the ``compress.plugins`` group)."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        super().__init__(group, "method", _instantiate, lambda m: m.name, "see `compress plugins`")

    def describe(self) -> list[PluginInfo]:
        """Every discovered method, importing each (for ``compress plugins``)."""
        infos = []
        for name in self.names():
            dist = self.declared_by(name)
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


registry = Registry()
