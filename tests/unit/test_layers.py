"""Imports in the package point one way, down these layers (issue 15), and cross a package
boundary only through the package's front door.

=====  ====================  =============================================================
row    layer                 units (a top-level module, or a package with its submodules)
=====  ====================  =============================================================
 1     entry points          ``__main__``
 2                           ``cli``
 3                           ``demo`` (builds a gateway over the sandbox)
 4     composition root      ``app``: builds and wires every part, does nothing else
 5                           ``reload``: applies a re-read config to the running parts
 6     frontends             ``smtp_in``, ``imap_out``, ``pop3_out``, ``admin``
 7     core                  ``send_as`` (Gmail aliases into the accounts)
 8                           ``spool``, ``mailbox``, ``accounts``, ``notify``
 9                           ``login_gate``
10     providers             ``providers`` (Graph, Gmail, upstream SMTP/IMAP/POP3)
11     oauth                 ``oauth`` (tokens for the API providers, consent)
12     listener plumbing     ``runtime`` (listeners, reactor, Deferred ⇄ coroutine)
13                           ``acceptor`` (accept loop, descriptor limits)
14                           ``admission`` (connection caps), ``outbound`` (TLS for clients),
                             ``proxy_protocol`` (the PROXY header of a load balancer)
15     store/config          ``store``, ``config``
16     bottom                ``delivery`` (the delivery vocabulary), ``logs``, ``metrics``,
                             ``passwords``, ``tls``, ``cleartext``, the package ``__init__``
=====  ====================  =============================================================

A unit may import units in rows below its own, never above nor in its row: the units of a row
are independent of each other. ``gateway.delivery`` sits at the bottom so that smtp_in, the
spool, the providers and oauth share ``Envelope`` and the delivery errors without a cycle.

Across units an import names the package (``from ..spool import FileSpool``), taking what its
``__init__`` exports or one of its public modules (``from .imap_out import server``); it never
reaches past the front door (``from ..spool._types import ...``, ``from ..imap_out.server
import ...``) nor into a private module. Imports under ``if TYPE_CHECKING:`` count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"

ROOT = "__init__"  # the package's own __init__ (``__version__``)
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("entry points", frozenset({"__main__"})),
    ("entry points", frozenset({"cli"})),
    ("entry points", frozenset({"demo"})),
    ("composition root", frozenset({"app"})),
    ("composition root", frozenset({"reload"})),
    ("frontends", frozenset({"smtp_in", "imap_out", "pop3_out", "admin"})),
    ("core", frozenset({"send_as"})),
    ("core", frozenset({"spool", "mailbox", "accounts", "notify"})),
    ("core", frozenset({"login_gate"})),
    ("providers", frozenset({"providers"})),
    ("oauth", frozenset({"oauth"})),
    ("listener plumbing", frozenset({"runtime"})),
    ("listener plumbing", frozenset({"acceptor"})),
    ("listener plumbing", frozenset({"admission", "outbound", "proxy_protocol"})),
    ("store/config", frozenset({"store", "config"})),
    (
        "bottom",
        frozenset({"delivery", "logs", "metrics", "passwords", "tls", "cleartext", ROOT}),
    ),
)


def _row(unit: str, layers: tuple[tuple[str, frozenset[str]], ...]) -> int | None:
    return next((i for i, (_, units) in enumerate(layers) if unit in units), None)


def _module_parts(root: Path, path: Path) -> tuple[str, ...]:
    """``gateway/spool/_spool.py`` → ("spool", "_spool"); a package's __init__ → ("spool",)."""
    parts = path.relative_to(root).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def _imported(
    root: Path, path: Path, node: ast.Import | ast.ImportFrom
) -> list[tuple[tuple[str, ...], bool]]:
    """Every module (inside the package, as parts) this statement names, each with whether the
    statement's own ``from`` part names it: for ``from X import a, b`` that is X, and ``X.a``
    too where ``a`` is a module of X."""
    if isinstance(node, ast.Import):
        names = [alias.name.split(".") for alias in node.names]
        return [(tuple(n[1:]) or (ROOT,), True) for n in names if n[0] == root.name]
    module = tuple(node.module.split(".")) if node.module else ()
    if node.level == 0:
        if module[:1] != (root.name,):
            return []
        base = module[1:]
    else:
        package = path.relative_to(root).parent.parts
        up = node.level - 1
        base = package[: len(package) - up] + module
    found = [(base or (ROOT,), True)]
    for alias in node.names:
        where = root.joinpath(*base, alias.name)
        if where.with_suffix(".py").is_file() or (where / "__init__.py").is_file():
            found.append(((*base, alias.name), False))
    return found


def violations(root: Path, layers: tuple[tuple[str, frozenset[str]], ...] = LAYERS) -> list[str]:
    """One line per import against the rules, naming the file, line and module imported."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        own = _module_parts(root, path)
        unit = own[0] if own != ("__init__",) else ROOT
        where = f"{path.relative_to(root.parent)}"
        row = _row(unit, layers)
        if row is None:
            problems.append(f"{where}: unit {unit!r} has no layer; add it to LAYERS")
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target, from_part in _imported(root, path, node):
                    if target[0] != unit:
                        at = f"{where}:{node.lineno} imports {'.'.join((root.name, *target))}"
                        problems += _against_rules(at, unit, row, target, from_part, layers)
    return problems


def _against_rules(
    at: str,
    unit: str,
    row: int,
    target: tuple[str, ...],
    from_part: bool,
    layers: tuple[tuple[str, frozenset[str]], ...],
) -> list[str]:
    other = target[0]
    problems = []
    if any(part.startswith("_") for part in target[1:]):
        problems.append(f"{at}: a private module of another package")
    elif from_part and len(target) > 1:
        problems.append(f"{at}: past the package's front door; import from {other}")
    other_row = _row(other, layers)
    if other_row is None:
        problems.append(f"{at}: unit {other!r} has no layer; add it to LAYERS")
    elif other_row <= row:
        problems.append(
            f"{at}: {layers[row][0]} ({unit}, row {row + 1}) may not import "
            f"{layers[other_row][0]} ({other}, row {other_row + 1})"
        )
    return problems


def test_imports_follow_the_layers() -> None:
    assert violations(PACKAGE) == []


def test_the_check_finds_upward_sideways_and_private_imports(tmp_path: Path) -> None:
    """Each kind of breach in a small package of its own (a check that finds nothing proves
    nothing): an upward import, one within a row, one into a private module, and one that
    reaches past a package's __init__ into a public module."""
    root = tmp_path / "gateway"
    for package in ("spool", "providers", "smtp_in"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "spool" / "_types.py").write_text("")
    (root / "delivery.py").write_text("")
    (root / "providers" / "gmail.py").write_text(
        "from ..spool._types import Envelope\nfrom ..delivery import Temporary\n"
    )
    (root / "spool" / "_spool.py").write_text("from ..providers.gmail import GmailSender\n")
    (root / "smtp_in" / "front.py").write_text(
        "from ..spool import FileSpool\nfrom .. import delivery\nfrom gateway import spool\n"
    )
    (root / "accounts.py").write_text("from . import delivery\nfrom .mailbox import View\n")
    layers = (
        ("frontends", frozenset({"smtp_in"})),
        ("core", frozenset({"spool", "accounts"})),
        ("providers", frozenset({"providers"})),
        ("bottom", frozenset({"delivery", ROOT})),
    )
    assert violations(root, layers) == [
        "gateway/accounts.py:2 imports gateway.mailbox: unit 'mailbox' has no layer; add it "
        "to LAYERS",
        "gateway/providers/gmail.py:1 imports gateway.spool._types: a private module of another "
        "package",
        "gateway/providers/gmail.py:1 imports gateway.spool._types: providers (providers, row 3) "
        "may not import core (spool, row 2)",
        "gateway/spool/_spool.py:1 imports gateway.providers.gmail: past the package's front "
        "door; import from providers",
    ]


def test_every_module_has_a_layer(tmp_path: Path) -> None:
    """A new top-level module must be placed in the table before it can import anything."""
    root = tmp_path / "gateway"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "newcomer.py").write_text("import json\n")
    assert violations(root, (("bottom", frozenset({ROOT})),)) == [
        "gateway/newcomer.py: unit 'newcomer' has no layer; add it to LAYERS"
    ]
