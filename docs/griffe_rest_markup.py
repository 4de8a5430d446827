"""Griffe extension: render the reStructuredText markup of the docstrings in Markdown.

The docstrings follow the Google layout (``Args:``, ``Attributes:``) but mark names with Sphinx
roles (``:class:`~ilvae.models.VAE```), end a paragraph with ``::`` before a literal block and
hold a few simple tables (``=====  =====``). For the site, without changing the sources:

- a role becomes a link to the named object where the site documents it, plain code otherwise
  (an optional cross-reference of mkdocs-autorefs, so a name the site does not document is not
  an error); ``~`` shows the last component only, as in Sphinx;
- ``::`` at the end of a line becomes ``:`` (the indented block after it is already code);
- a simple table becomes a code block, keeping its columns aligned.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)(\(\))?`")
_LITERAL = re.compile(r"(?<=\S)::$", flags=re.M)
_BORDER = re.compile(r"^(\s*)=+(?:\s+=+)+\s*$")


def _target(obj: griffe.Object, name: str) -> str:
    """Full path of the object ``name`` refers to from ``obj``, or ``name`` itself."""
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head) + (f".{rest}" if rest else "")
    except (griffe.NameResolutionError, ValueError):
        path = name
    try:
        member = obj.modules_collection.get_member(path)
        return member.final_target.path if member.is_alias else member.path
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path


def _roles(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match) -> str:
        short, name, call = match.groups()
        title = (name.rsplit(".", 1)[-1] if short else name) + (call or "")
        identifier = html.escape(_target(obj, name), quote=True)
        code = f"<code>{html.escape(title)}</code>"
        return f'<autoref identifier="{identifier}" optional>{code}</autoref>'

    return _ROLE.sub(link, text)


def _tables(text: str) -> str:
    """Fence each simple table: from its first border line through its third."""
    lines, out, borders, indent = text.splitlines(), [], 0, ""
    for line in lines:
        match = _BORDER.match(line)
        if match and borders == 0:
            indent = match.group(1)
            out.append(f"{indent}```text")
        out.append(line)
        if match:
            borders += 1
            if borders == 3:
                out.append(f"{indent}```")
                borders = 0
    return "\n".join(out)


def _convert(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        value = _tables(obj.docstring.value)
        obj.docstring.value = _LITERAL.sub(":", _roles(obj, value))
    for member in obj.members.values():
        if not member.is_alias:
            _convert(member)


class ReSTMarkup(griffe.Extension):
    """Convert the docstrings of a package once it is loaded (after its sub-packages)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        _convert(pkg)
