"""Bearer tokens per team: the config holds sha256(token) and a scope; `read` lists and reads the team's
own jobs, `write` also uploads, submits and cancels them, `admin` also sees and cancels every team's jobs.
No `tokens` key in the config means no auth (local use: one `local` team with admin rights).

The service checks the token from the request headers alone, in an ASGI middleware that runs before any
request body is read (`teacher_server.app`)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from teacher_server.config import TokenConfig

SCOPES = {"read": 0, "write": 1, "admin": 2}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    team: str
    scope: str

    def can(self, scope: str) -> bool:
        return SCOPES[self.scope] >= SCOPES[scope]

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def owns(self, team: str) -> bool:
        """Whether this principal may see and act on a job of `team` (its own, or any with admin)."""
        return self.is_admin or self.team == team


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Authenticator:
    def __init__(self, tokens: list[TokenConfig] | None):
        self.enabled = tokens is not None
        self._tokens = list(tokens or [])

    def principal(self, authorization: str | None) -> Principal:
        """Who sent a request, from its `Authorization` header; raises AuthError(401) when unknown."""
        if not self.enabled:
            return Principal(team="local", scope="admin")
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
        digest = hash_token(authorization[7:].strip())
        for t in self._tokens:
            if hmac.compare_digest(digest, t.sha256):
                return Principal(team=t.team, scope=t.scope)
        raise AuthError(401, "unknown bearer token")

    def require(self, authorization: str | None, scope: str) -> Principal:
        p = self.principal(authorization)
        if not p.can(scope):
            raise AuthError(403, f"team {p.team!r} has a {p.scope} token; this request needs a {scope} token")
        return p
