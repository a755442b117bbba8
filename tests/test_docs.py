"""The API reference has no gaps: every module of zotune has a reference page entry, and every public class,
function and method a docstring. (``make test`` builds the site with ``mkdocs build --strict``, which fails
on broken links and on docstrings that name parameters a signature does not have.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
griffe = pytest.importorskip("griffe")


def package():
    return griffe.load("zotune", search_paths=[str(ROOT / "src")], docstring_parser="google")


def modules(module):
    yield module
    for name, member in module.members.items():
        if not member.is_alias and member.is_module and not name.startswith("_"):
            yield from modules(member)


def documented_by_a_base(cls, name: str) -> bool:
    for base in cls.mro():
        member = base.members.get(name)
        if member is not None and not member.is_alias and member.docstring:
            return True
    return False


def undocumented(module) -> list[str]:
    missing = []
    for name, member in module.members.items():
        if member.is_alias or member.is_module or name.startswith("_") or not (member.is_class or member.is_function):
            continue
        if not member.docstring:
            missing.append(member.path)
        if member.is_class:
            for method_name, method in member.members.items():
                if method_name.startswith("_") or method.is_alias or not method.is_function or method.docstring:
                    continue
                if not documented_by_a_base(member, method_name):  # a protocol's method is documented once
                    missing.append(method.path)
    return missing


def test_every_module_has_a_reference_entry():
    pages = "\n".join(page.read_text() for page in (ROOT / "docs" / "reference").glob("*.md"))
    listed = set(re.findall(r"^::: ([\w.]+)", pages, flags=re.M))
    names = {module.path for module in modules(package())}
    assert names - listed == set(), "add these modules to a page under docs/reference/"
    assert listed - names == set(), "these reference entries name no module"


def test_every_public_class_function_and_method_has_a_docstring():
    missing = [path for module in modules(package()) for path in undocumented(module)]
    assert missing == []


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(page.relative_to(ROOT / "docs")) for page in (ROOT / "docs").rglob("*.md")}
    assert {page for page in pages if page not in nav} == set()


def test_the_readme_links_into_the_docs_only_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "the README leads into the docs"
    for link in links:
        assert not re.match(r"\w+://", link), f"the README points outside the repository: {link}"
        assert (ROOT / link).exists(), link
