"""The audit log: who did what to which tenant's tokens, printers and jobs, one structured line each.

Entries go to the ``printrelay.audit`` logger at INFO with an ``audit`` field (a JSON object in the JSON log
format), so operators can route them to their own sink with a logging filter on the logger name. An
entry never carries a secret: tokens appear by their public id only.

Actions: ``token.created``, ``token.revoked``, ``user.created``, ``user.changed`` (role, state,
password), ``tenant.created`` (a child tenant, over the integrator API), ``connector.session_closed`` (after
a revocation),
``printer.adopted``, ``printer.changed``, ``printer.removed``, ``job.released``, ``job.canceled``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.auth import Principal

log = logging.getLogger("printrelay.audit")

ACTIONS = frozenset(
    {
        "token.created",
        "token.revoked",
        "user.created",
        "user.changed",
        "tenant.created",
        "connector.session_closed",
        "printer.adopted",
        "printer.changed",
        "printer.removed",
        "job.released",
        "job.canceled",
    }
)
# Free text in an entry is cut to this; an audit line must stay one bounded line.
MAX_DETAIL_CHARS = 256


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_DETAIL_CHARS:
        return value[:MAX_DETAIL_CHARS] + "..."
    return value


def entry(action: str, *, tenant: str, actor: str, target: str, **details: Any) -> dict[str, Any]:
    """The structured record of one action (what :func:`record` logs)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    return {
        "action": action,
        "tenant": tenant,
        "actor": actor,
        "target": target,
        "at": round(time.time(), 3),
        **{k: _bounded(v) for k, v in details.items() if v is not None},
    }


def record(action: str, *, tenant: str, actor: str, target: str, **details: Any) -> dict[str, Any]:
    """Log one audited action. ``actor`` is ``token:<id>`` for API callers, ``cli`` for the command line."""
    item = entry(action, tenant=tenant, actor=actor, target=target, **details)
    log.info("%s %s by %s", action, target, actor, extra={"audit": item, "tenant": tenant})
    return item


def actor_of(token_id: str) -> str:
    return f"token:{token_id}"


def actor(principal: Principal) -> str:
    """``user:EMAIL`` for a person (by password or their token), ``token:ID`` for an application."""
    return f"user:{principal.email}" if principal.user_id else actor_of(principal.token_id)
