"""Files that ship with the code: the licence, the documents its comments cite, and the one answer
the docs give to "which certificate do clients trust"."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from gateway import tls

REPO = Path(__file__).resolve().parents[2]


def test_license_is_the_full_apache_2_text_pyproject_names() -> None:
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == (
        "Apache-2.0"
    )
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    for part in ("TERMS AND CONDITIONS FOR USE", "9. Accepting Warranty", "END OF TERMS"):
        assert part in text
    assert len(text) > 11000  # the whole licence, not a pointer to it


def _cited_documents() -> set[str]:
    cited = set()
    sources = [*REPO.glob("gateway/**/*.py"), *REPO.glob("tests/**/*.py"), REPO / "README.md"]
    for source in sources:
        cited.update(re.findall(r"\b(docs/[\w.-]+\.md)\b", source.read_text(encoding="utf-8")))
    return cited


def test_documents_cited_in_code_are_in_the_repository() -> None:
    cited = _cited_documents()
    assert {"docs/protocol-servers.md", "docs/DESIGN.md"} <= cited
    missing = sorted(path for path in cited if not (REPO / path).is_file())
    assert not missing, f"cited but not in the repository: {missing}"


def test_readme_and_example_name_the_generated_ca_for_clients(tmp_path: Path) -> None:
    pair = tls.ensure_certificate(tmp_path, "localhost")
    assert pair.ca == tmp_path / "tls" / "ca.crt"
    for doc in ("README.md", "config.example.yaml"):
        text = " ".join((REPO / doc).read_text().split())
        assert "state_dir/tls/ca.crt" in text, doc
        assert "gateway.crt to clients" not in text, doc
