"""Errors the engine raises for conditions its callers tell apart by type (torch-free).

A service chooses the status a client gets by these types (``protos.errors``), never by their
message, so a message can be reworded freely. Every one of them says what is wrong in its message,
field name first where there is a field.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that can never run here (an empty prompt, a token id past the vocabulary, more
    tokens than the KV pool holds); the message starts with the field name. A ``ValueError`` so
    offline callers catching one keep working."""


class AlreadyRunning(InvalidRequest):
    """A request with this id is already in the engine: ids name requests, so a second one with the
    same id is refused rather than mixed up with the first."""


class EngineFailed(RuntimeError):
    """The engine loop is gone (see ``AsyncEngine.failure``): this instance serves nothing more."""
