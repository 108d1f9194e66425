"""The portal: web pages of the relay for people (their jobs, printing, release at the printer) and the
console of tenant admins. See relay/portal/handler.py."""

from relay.portal.handler import Portal

__all__ = ["Portal"]
