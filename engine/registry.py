"""One registry type for every pluggable family: attention backends, layer ops, KV transfer backends,
routing policies (mini-sglang's ``Registry``, with capabilities and checked options).

A family creates one ``Registry`` and registers a factory per name, optionally with a *capability
record*: a frozen dataclass of the family's own choosing that says what the entry can do (devices it
runs on, whether it serves a tensor-parallel instance, ...). Callers decide from the record, never by
comparing names, so a new backend is one registration and no edits elsewhere.

Options are checked, not dropped: an entry accepts the options its factory declares (its keyword-only
parameters and those with a default; or the ``options`` given at registration, for a factory that
takes ``**kwargs``), and anything else raises ``UnknownOption`` naming the option and the allowed
ones. An unknown name raises ``UnknownName`` listing the known ones. Both are ``ValueError``s, so a
service maps them to INVALID_ARGUMENT / exit status 2 like any other configuration error.

Torch-free: families import their heavy modules inside the factories.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")
C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownName(ValueError):
    """A name no entry of the family is registered under."""


class UnknownOption(ValueError):
    """An option the named entry's factory does not take."""


class DuplicateName(ValueError):
    """A second registration under a name already taken (two modules claiming one backend)."""


@dataclass(frozen=True)
class Entry(Generic[T, C]):
    name: str
    factory: Callable[..., T]
    caps: C | None
    options: frozenset[str]


class Registry(Generic[T, C]):
    """Name → factory of ``T``, each with an optional capability record of type ``C``.

    ``family`` names the kind of thing in messages ("kv backend", "routing policy").
    Registration order is kept (``names(ordered=True)``) for families that prefer earlier entries.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T, C]] = {}

    @overload
    def register(
        self, name: str, factory: None = None, *, caps: C | None = None, options: Iterable[str] | None = None
    ) -> Callable[[F], F]: ...

    @overload
    def register(
        self, name: str, factory: F, *, caps: C | None = None, options: Iterable[str] | None = None
    ) -> F: ...

    def register(
        self,
        name: str,
        factory: Callable[..., Any] | None = None,
        *,
        caps: C | None = None,
        options: Iterable[str] | None = None,
    ) -> Any:
        """Register ``factory`` under ``name``; without ``factory``, a decorator that does.

        ``options``: the keyword options the factory takes, for a factory whose signature cannot
        say (``**kwargs``); by default they are read from the signature."""

        def add(fn: F) -> F:
            if name in self._entries:
                raise DuplicateName(f"{self.family} {name!r} is registered twice")
            allowed = frozenset(options) if options is not None else _declared_options(self.family, name, fn)
            self._entries[name] = Entry(name, fn, caps, allowed)
            return fn

        return add if factory is None else add(factory)  # type: ignore[arg-type]

    def entry(self, name: str) -> Entry[T, C]:
        self.check(name)
        return self._entries[name]

    def check(self, name: str, field: str | None = None) -> None:
        """``UnknownName`` unless ``name`` is registered; ``field``: the setting it came from, named
        first in the message (``"kv_backend: unknown kv backend 'foo' (known: ...)"``)."""
        if name not in self._entries:
            where = f"{field}: " if field else ""
            raise UnknownName(f"{where}unknown {self.family} {name!r} (known: {', '.join(self.names())})")

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``."""
        return self.entry(name).factory

    def caps(self, name: str) -> C:
        """``name``'s capability record (``UnknownName`` for an unknown name)."""
        caps = self.entry(name).caps
        assert caps is not None, f"{self.family} {name!r} was registered without a capability record"
        return caps

    def options(self, name: str) -> frozenset[str]:
        """The option names ``name``'s factory takes."""
        return self.entry(name).options

    def check_options(self, name: str, options: Iterable[str]) -> None:
        """``UnknownOption`` for the first of ``options`` that ``name`` does not take."""
        allowed = self.options(name)
        for option in options:
            if option not in allowed:
                takes = ", ".join(sorted(allowed)) if allowed else "none"
                raise UnknownOption(f"{self.family} {name!r}: unknown option {option!r} (allowed: {takes})")

    def select(self, name: str, **candidates: Any) -> dict[str, Any]:
        """Of ``candidates``, those ``name`` takes: for a caller that holds settings of several
        entries (a service's config) and passes each entry its own."""
        allowed = self.options(name)
        return {k: v for k, v in candidates.items() if k in allowed}

    def create(self, name: str, *args: Any, **options: Any) -> T:
        """``name``'s factory called with ``args`` and ``options`` (checked first)."""
        entry = self.entry(name)
        self.check_options(name, options)
        return entry.factory(*args, **options)

    def names(self, ordered: bool = False) -> tuple[str, ...]:
        """Every registered name: sorted, or in registration order (``ordered``)."""
        return tuple(self._entries) if ordered else tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.family!r}: {', '.join(self.names())})"


def _declared_options(family: str, name: str, factory: Callable[..., Any]) -> frozenset[str]:
    """A factory's options: its keyword-only parameters and those with a default (the leading
    positional ones are what every entry of the family is given)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise TypeError(f"{family} {name!r}: the factory takes **kwargs; declare its options at registration")
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        or (p.kind in kinds and p.default is not inspect.Parameter.empty)
    )
