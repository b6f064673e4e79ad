"""Who may use a vector store: its owner, the keys an admin shared it with (read only), and admin keys.

The owner of a request is an opaque key id, ``key-`` and a digest of the bearer key (the Files API's
``key_owner``; the key itself never leaves the ingress): the ingress derives it and passes it with every call
to the retriever replica, where the records are. ``None`` means no scoping: a server without API keys (open,
as before keys existed) or an internal caller (a batch job). A store created on an open server has no owner,
so once keys are configured only admin keys see it (and may share it).

A key that does not own a store and was not given it gets the same 404 as for a store that does not exist,
so store ids cannot be probed. A key a store was shared with reads and searches it; changing it is the
owner's (or an admin's): a 403.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from pydantic import Field

from mmrag.serving.errors import OpenAIError
from mmrag.serving.retrieval.protocol import RetrievalOptions


def key_id(key: str) -> str:
    """The owner id of an API key (the same digest as ``files_api.key_owner`` takes from a request)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class PermissionDeniedError(OpenAIError):
    status_code = 403
    error_type = "permission_error"


class Access:
    """The visibility rules, given the admin key ids of this server's configuration."""

    def __init__(self, admin_keys: Iterable[str]) -> None:
        self.admins = frozenset(key_id(key) for key in admin_keys)

    def unscoped(self, owner: str | None) -> bool:
        """Sees every store: no keys (``None``), or an admin key."""
        return owner is None or owner in self.admins

    def file_owner(self, owner: str | None) -> str | None:
        """The owner to look files up with: a key attaches only its own uploads; an admin any file."""
        return None if self.unscoped(owner) else owner

    def visible(self, owner: str | None) -> tuple[str, tuple[Any, ...]]:
        """A SQL condition (and its arguments) on ``stores`` for the stores ``owner`` may read."""
        if self.unscoped(owner):
            return "1", ()
        return "(owner = ? OR id IN (SELECT vector_store_id FROM shares WHERE owner = ?))", (owner, owner)


class OwnedRetrievalOptions(RetrievalOptions):
    """A chat request's ``retrieval`` with the owner of its key, as the ingress passes it to the retriever:
    a client cannot set ``owner`` (the request's own ``retrieval`` forbids unknown fields)."""

    owner: str | None = Field(default=None, description="The request's key id; None: an open server.")


def with_owner(options: RetrievalOptions | None, owner: str | None) -> RetrievalOptions | None:
    """``options`` carrying ``owner`` where it matters (vector stores named on a server with keys)."""
    if owner is None or options is None or not options.vector_store_ids:
        return options
    return OwnedRetrievalOptions.model_validate({**options.model_dump(exclude_unset=True), "owner": owner})


def options_owner(options: Any) -> str | None:
    """The key id the ingress put on a chat's retrieval options; None: an open server or an internal caller."""
    return options.owner if isinstance(options, OwnedRetrievalOptions) else None
