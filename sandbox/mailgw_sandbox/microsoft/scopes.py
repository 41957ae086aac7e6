"""Scope strings as Entra reads them, and which Graph permissions each Graph call needs.

Clients spell Graph scopes either short (``Mail.Send``) or as a URI
(``https://graph.microsoft.com/Mail.Send``); both mean the same permission, case-insensitively.
Grants store the canonical short name so that Graph can check them; token responses echo what
the client asked for, verbatim, because MSAL files cached tokens under those exact strings.
"""

from __future__ import annotations

from dataclasses import dataclass

GRAPH_RESOURCE = "https://graph.microsoft.com/"
GRAPH_DEFAULT = GRAPH_RESOURCE + ".default"
OIDC = frozenset({"openid", "profile", "offline_access", "email"})

# Delegated permissions of Graph that the sandbox knows, in Microsoft's spelling.
DELEGATED = (
    "User.Read",
    "User.ReadBasic.All",
    "Mail.ReadBasic",
    "Mail.Read",
    "Mail.ReadWrite",
    "Mail.Send",
)
_CANONICAL = {name.casefold(): name for name in DELEGATED}

# What each kind of Graph call accepts; a wider permission implies the narrower one.
READ_MAIL = frozenset({"Mail.Read", "Mail.ReadWrite"})
WRITE_MAIL = frozenset({"Mail.ReadWrite"})
SEND_MAIL = frozenset({"Mail.Send"})
READ_PROFILE = frozenset(
    {"User.Read", "User.ReadBasic.All", "User.Read.All", "Mail.ReadBasic"} | READ_MAIL | SEND_MAIL
)


class ScopeError(ValueError):
    """The scope parameter cannot be honoured; the message is the AADSTS description."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code


@dataclass(frozen=True)
class ScopeRequest:
    """A parsed ``scope`` parameter."""

    resource: tuple[str, ...]  # the Graph scopes exactly as spelled by the client
    permissions: frozenset[str]  # the same, as canonical short names
    oidc: frozenset[str]
    default: bool  # https://graph.microsoft.com/.default

    @property
    def echo(self) -> str:
        """The ``scope`` of a token response: the requested resource scopes, verbatim."""
        if self.default:
            return GRAPH_DEFAULT
        if self.resource:
            return " ".join(self.resource)
        return " ".join(sorted(self.oidc - {"offline_access"}))


def parse(text: str) -> ScopeRequest:
    """Split a space-separated ``scope`` value; unknown or mixed resources are refused."""
    resource: list[str] = []
    permissions: set[str] = set()
    oidc: set[str] = set()
    default = False
    for scope in text.split():
        if scope.casefold() in OIDC:
            oidc.add(scope.casefold())
            continue
        name = _graph_name(scope)
        if name == ".default":
            default = True
        else:
            permissions.add(name)
        resource.append(scope)
    if default and permissions:
        raise ScopeError(
            70011,
            f"The provided value for the input parameter 'scope' is not valid. The scope "
            f"'{text}' is not valid. .default scope can't be combined with resource-specific "
            "scopes.",
        )
    return ScopeRequest(tuple(resource), frozenset(permissions), frozenset(oidc), default)


def _graph_name(scope: str) -> str:
    if "://" in scope:
        if not scope.casefold().startswith(GRAPH_RESOURCE):
            raise ScopeError(
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope "
                f"'{scope}' does not exist on a resource this tenant knows.",
            )
        scope = scope[len(GRAPH_RESOURCE) :]
    if scope == ".default":
        return scope
    canonical = _CANONICAL.get(scope.casefold())
    if canonical is None:
        raise ScopeError(
            70011,
            f"The provided value for the input parameter 'scope' is not valid. The scope "
            f"'{scope}' does not exist on the resource Microsoft Graph.",
        )
    return canonical
