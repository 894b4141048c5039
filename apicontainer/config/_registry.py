"""
Stash types, found by name.

The built-in types are listed here; other packages add theirs through the
entry point group C{apicontainer.stashes}, each naming a factory::

    [options.entry_points]
    apicontainer.stashes =
        mystore = mypackage.stash:MyStash.fromConfig

A factory is called as C{factory(spec, context)} with the stash's
L{apicontainer.config.StashSpec} (its options are read through
C{spec.options}, a L{apicontainer.config.Section}) and a
L{apicontainer.stashes.StashContext}, and returns an
L{apicontainer.interfaces.IStash} provider. It validates its options and
opens nothing: opening is done by C{start} (L{apicontainer.interfaces.IStartable}).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import Logger

if TYPE_CHECKING:
    from ..stashes import StashContext
    from ._load import StashSpec

StashFactory = Callable[["StashSpec", "StashContext"], Any]

ENTRY_POINT_GROUP = "apicontainer.stashes"

BUILTIN = {
    "filesystem": "apicontainer.stashes._filesystem:FilesystemStash.fromConfig",
    "http": "apicontainer.stashes._http:HTTPStash.fromConfig",
    "postgres": "apicontainer.stashes._postgres:PostgresStash.fromConfig",
    "redis": "apicontainer.stashes._redis:RedisStash.fromConfig",
    "sqlite": "apicontainer.stashes._sqlite:SQLiteStash.fromConfig",
}

log = Logger()


def _load(reference: str) -> StashFactory:
    module, _, attribute = reference.partition(":")
    target: Any = import_module(module)
    for name in attribute.split("."):
        target = getattr(target, name)
    return target  # type: ignore[no-any-return]


def stashTypes() -> dict[str, Callable[[], StashFactory]]:
    """
    Every known stash type, mapped to a loader of its factory. A built-in
    name cannot be taken over by another package.
    """
    types: dict[str, Callable[[], StashFactory]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in BUILTIN:
            log.warn(
                "ignoring stash type {name} from {value}: the name is built in",
                name=entry.name,
                value=entry.value,
            )
            continue
        types[entry.name] = entry.load
    for name, reference in BUILTIN.items():
        types[name] = _loader(reference)
    return dict(sorted(types.items()))


def _loader(reference: str) -> Callable[[], StashFactory]:
    return lambda: _load(reference)


def stashFactory(kind: str) -> StashFactory:
    """
    The factory of stash type C{kind}.

    @raise KeyError: No such type.
    """
    return stashTypes()[kind]()
