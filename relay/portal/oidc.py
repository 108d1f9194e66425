"""OpenID Connect sign-in to the portal: the authorization code flow with PKCE, per tenant.

A tenant's provider (``OidcProvider`` in the store: issuer, client id, sealed client secret) is found by
discovery (``{issuer}/.well-known/openid-configuration``). authlib builds the authorization request
(state, nonce, S256 code challenge) and the token request; the ID token's signature is checked against the
provider's published keys (joserfc) and its claims here: issuer, audience, expiry, nonce. The email claim
comes from the ID token or, when the provider keeps it for the userinfo endpoint, from there (same
subject). Every answer from the provider is bounded in size and time.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from relay.secretbox import SecretBox
from relay.store.base import OidcProvider

MAX_ANSWER = 256 * 1024  # bytes of any document the provider sends
TIMEOUT = 10.0  # seconds for each request to the provider
CACHE_FOR = 600.0  # discovery documents and keys are fetched again after this long
CLOCK_SKEW = 120.0  # seconds an ID token's times may be off
SCOPE = "openid email"
# Signatures by the provider's published keys only: never "none", nor an HMAC keyed by the client secret.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class OidcError(Exception):
    """Sign-in with the provider failed; the message is safe to show to the person."""


def check_issuer(issuer: str) -> str:
    """An issuer URL the relay will talk to: https, or http on a loopback address (tests, local setups)."""
    parts = urllib.parse.urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            f"the issuer must be an https:// URL without query or fragment, not {issuer[:100]!r}"
        )
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(f"the issuer must use https (http only on a loopback address), not {issuer[:100]!r}")
    return issuer  # exactly as the provider names itself: ID tokens must carry the same (some end in "/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def seal_client_secret(box: SecretBox, tenant: str, secret: str) -> bytes:
    return box.seal(secret, f"oidc-client-secret:{tenant}").encode()


def open_client_secret(box: SecretBox, provider: OidcProvider) -> str:
    if not provider.client_secret_sealed:
        return ""
    return box.open(provider.client_secret_sealed.decode(), f"oidc-client-secret:{provider.tenant}")


@dataclass(frozen=True)
class Discovery:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    auth_methods: tuple[str, ...]


@dataclass(frozen=True)
class Identity:
    subject: str
    email: str


class OidcClient:
    def __init__(self, *, timeout: float = TIMEOUT) -> None:
        self._timeout = timeout
        self._discovered: dict[str, tuple[Discovery, float]] = {}
        self._keys: dict[str, tuple[KeySet, float]] = {}

    async def _get_json(self, client: httpx.AsyncClient, url: str, **kwargs: Any) -> Any:
        return await self._json(client, "GET", url, **kwargs)

    async def _json(self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Any:
        try:
            async with client.stream(method, url, **kwargs) as response:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise OidcError(
                            f"the sign-in provider's answer from {url} is over {MAX_ANSWER} bytes"
                        )
                status = response.status_code
        except httpx.HTTPError as exc:
            raise OidcError(f"the sign-in provider cannot be reached ({type(exc).__name__})") from None
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if status != 200:
            reason = document.get("error", "") if isinstance(document, dict) else ""
            raise OidcError(f"the sign-in provider answered {status} {str(reason)[:100]}".strip())
        if not isinstance(document, dict):
            raise OidcError(f"the sign-in provider's answer from {url} is not a JSON object")
        return document

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)

    async def discover(self, issuer: str) -> Discovery:
        try:
            check_issuer(issuer)
        except ValueError as exc:
            raise OidcError(str(exc)) from None
        found = self._discovered.get(issuer)
        if found is not None and found[1] > time.monotonic():
            return found[0]
        async with self._client() as client:
            doc = await self._get_json(client, f"{issuer.rstrip('/')}/.well-known/openid-configuration")

        def url(name: str, required: bool = True) -> str | None:
            value = doc.get(name)
            if isinstance(value, str) and value.startswith(("https://", "http://")) and len(value) < 2048:
                return value
            if required:
                raise OidcError(f"the sign-in provider's configuration has no usable {name}")
            return None

        if doc.get("issuer") != issuer:
            raise OidcError("the sign-in provider's configuration names another issuer")
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        discovery = Discovery(
            issuer=issuer,
            authorization_endpoint=url("authorization_endpoint") or "",
            token_endpoint=url("token_endpoint") or "",
            jwks_uri=url("jwks_uri") or "",
            userinfo_endpoint=url("userinfo_endpoint", required=False),
            auth_methods=tuple(m for m in methods if isinstance(m, str)),
        )
        if len(self._discovered) > 1000:
            self._discovered.clear()
        self._discovered[issuer] = (discovery, time.monotonic() + CACHE_FOR)
        return discovery

    async def _key_set(self, discovery: Discovery, *, fresh: bool = False) -> KeySet:
        found = self._keys.get(discovery.jwks_uri)
        if found is not None and found[1] > time.monotonic() and not fresh:
            return found[0]
        async with self._client() as client:
            doc = await self._get_json(client, discovery.jwks_uri)
        try:
            keys = KeySet.import_key_set(doc)
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise OidcError(f"the sign-in provider's keys cannot be read ({exc})") from None
        if len(self._keys) > 1000:
            self._keys.clear()
        self._keys[discovery.jwks_uri] = (keys, time.monotonic() + CACHE_FOR)
        return keys

    def authorization_url(
        self,
        discovery: Discovery,
        provider: OidcProvider,
        *,
        redirect_uri: str,
        state: str,
        nonce: str,
        verifier: str,
        login_hint: str = "",
    ) -> str:
        extra = {"login_hint": login_hint} if login_hint else {}
        return str(
            prepare_grant_uri(
                discovery.authorization_endpoint, provider.client_id, "code", redirect_uri=redirect_uri,
                scope=SCOPE, state=state, nonce=nonce, code_challenge=create_s256_code_challenge(verifier),
                code_challenge_method="S256", **extra,
            )
        )  # fmt: skip

    async def finish(
        self,
        discovery: Discovery,
        provider: OidcProvider,
        client_secret: str,
        *,
        code: str,
        redirect_uri: str,
        verifier: str,
        nonce: str,
    ) -> Identity:
        """Trade the code for tokens and prove who signed in."""
        method = "client_secret_basic"
        if not client_secret:
            method = "none"  # a public client: PKCE alone binds the code to this sign-in
        elif method not in discovery.auth_methods and "client_secret_post" in discovery.auth_methods:
            method = "client_secret_post"
        body = prepare_token_request(
            "authorization_code", code=code, redirect_uri=redirect_uri, code_verifier=verifier
        )
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        auth = ClientAuth(provider.client_id, client_secret, method)
        uri, headers, body = auth.prepare("POST", discovery.token_endpoint, headers, body)
        async with self._client() as client:
            tokens = await self._json(client, "POST", uri, headers=headers, content=body)
            id_token = tokens.get("id_token")
            if not isinstance(id_token, str) or len(id_token) > MAX_ANSWER:
                raise OidcError("the sign-in provider sent no ID token")
            claims = await self._verified_claims(discovery, provider, id_token, nonce)
            subject = claims.get("sub")
            if not isinstance(subject, str) or not subject:
                raise OidcError("the ID token names no subject")
            source: Mapping[str, Any] = claims
            access_token = tokens.get("access_token")
            if provider.email_claim not in claims and discovery.userinfo_endpoint and access_token:
                # Providers that follow the spec to the letter keep scope claims for the userinfo endpoint.
                source = await self._get_json(
                    client, discovery.userinfo_endpoint, headers={"authorization": f"Bearer {access_token}"}
                )
                if source.get("sub") != subject:
                    raise OidcError("the userinfo endpoint describes another subject")
        email = source.get(provider.email_claim)
        if not isinstance(email, str) or not email:
            raise OidcError(f"the sign-in provider sent no {provider.email_claim} claim")
        if source.get("email_verified") is False:
            raise OidcError("the sign-in provider has not verified this email address")
        return Identity(subject, email)

    async def _verified_claims(
        self, discovery: Discovery, provider: OidcProvider, id_token: str, nonce: str
    ) -> dict[str, Any]:
        for fresh in (False, True):  # keys rotate: an unknown key is looked for once more
            keys = await self._key_set(discovery, fresh=fresh)
            try:
                claims = dict(jwt.decode(id_token, keys, algorithms=ALGORITHMS).claims)
                break
            except (JoseError, ValueError, KeyError) as exc:
                if fresh:
                    raise OidcError(f"the ID token's signature does not verify ({exc})") from None
        now = time.time()
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if claims.get("iss") != discovery.issuer:
            raise OidcError("the ID token comes from another issuer")
        if provider.client_id not in audiences or (
            len(audiences) > 1 and claims.get("azp") != provider.client_id
        ):
            raise OidcError("the ID token is for another client")
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires + CLOCK_SKEW < now:
            raise OidcError("the ID token has expired")
        issued = claims.get("iat")
        if isinstance(issued, int | float) and issued - CLOCK_SKEW > now:
            raise OidcError("the ID token was issued in the future")
        if claims.get("nonce") != nonce:
            raise OidcError("the ID token does not answer this sign-in (nonce)")
        return claims
