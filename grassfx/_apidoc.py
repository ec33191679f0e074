"""Write the API reference (``docs/api.md``) from the public docstrings.

``python -m grassfx._apidoc > docs/api.md`` regenerates it; ``tests/test_apidoc.py`` fails
when the file is stale, and when an argument of ``grassfx.compile`` or of a public
optimizer's ``__init__`` is missing from its docstring's ``Args:`` section.

Docstrings are Google style: a summary, paragraphs, then ``Args:``, ``Returns:``,
``Raises:`` and ``Example:`` sections. Args become a list, examples a code block;
everything else is copied as written.
"""

from __future__ import annotations

import importlib
import inspect
import re

__all__ = ["PUBLIC", "render", "documented_args", "main"]

# (heading, dotted path): the order of docs/api.md.
PUBLIC = (
    ("grassfx.compile", "grassfx.compile"),
    ("grassfx.finetune", "grassfx.finetune"),
    ("grassfx.optim.AdamW", "grassfx.optim.AdamW"),
    ("grassfx.optim.Muon", "grassfx.optim.Muon"),
    ("grassfx.optim.SGD", "grassfx.optim.SGD"),
    ("grassfx.optim.Adafactor", "grassfx.optim.Adafactor"),
    ("grassfx.explain", "grassfx.debug.explain"),
    ("grassfx.diff", "grassfx.debug.diff"),
    ("grassfx.unwrap", "grassfx.unwrap"),
)
SECTIONS = ("Args", "Returns", "Raises", "Example", "Examples")
_ENTRY = re.compile(r"^(\*{0,2}[\w\[\]]+(?:\s*(?:,|/)\s*\*{0,2}[\w\[\]]+)*)\s*:\s*(.*)$")


def resolve(path: str):
    """The object at a dotted ``path`` (``grassfx.optim.AdamW``)."""
    module, _, name = path.rpartition(".")
    obj = importlib.import_module(module)
    return getattr(obj, name)


def _sections(doc: str) -> list[tuple[str | None, list[str]]]:
    """Split a cleaned docstring into (section name or None, lines) in order."""
    out: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in doc.splitlines():
        head = line.strip().rstrip(":")
        if line.endswith(":") and not line.startswith(" ") and head in SECTIONS:
            out.append((head, []))
        else:
            out[-1][1].append(line)
    return out


def _entries(lines: list[str]) -> list[tuple[str, str]]:
    """``Args:``/``Raises:`` lines as (names, text) pairs; continuation lines joined."""
    entries: list[tuple[str, str]] = []
    for line in lines:
        text = line[4:] if line.startswith("    ") else line
        match = None if text.startswith(" ") else _ENTRY.match(text)
        if match:
            entries.append((match.group(1), match.group(2)))
        elif entries and line.strip():
            names, body = entries[-1]
            entries[-1] = (names, f"{body} {line.strip()}")
    return entries


def documented_args(obj) -> set[str]:
    """The argument names an object's docstring's ``Args:`` section describes."""
    names: set[str] = set()
    for section, lines in _sections(inspect.cleandoc(obj.__doc__ or "")):
        if section == "Args":
            for entry, _ in _entries(lines):
                names.update(n.strip().lstrip("*") for n in re.split(r"[,/]", entry))
    return names


def _dedent(lines: list[str]) -> str:
    return inspect.cleandoc("\n".join(lines))


def _signature(heading: str, obj) -> str:
    """``heading(arg=default, ...)``, annotations left out, one argument a line when long."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = [p.replace(annotation=inspect.Parameter.empty)
              for p in inspect.signature(target).parameters.values() if p.name != "self"]
    text = str(inspect.Signature(params))
    if len(heading) + len(text) <= 100:
        return heading + text
    parts, star = [], False
    for p in params:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        star |= p.kind is inspect.Parameter.VAR_POSITIONAL
        parts.append(str(p))
    return heading + "(\n" + "".join(f"    {part},\n" for part in parts) + ")"


def _markdown(text: str) -> str:
    """reST inline markup as Markdown: ``code`` and :role:`~target` become `code`."""
    text = re.sub(r":(?:class|func|meth|mod|attr|data):`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def render_one(heading: str, obj) -> str:
    """One object's section of docs/api.md."""
    parts = [f"## `{heading}`", "", "```python", _signature(heading, obj), "```", ""]
    for section, lines in _sections(inspect.cleandoc(obj.__doc__ or "")):
        if section in ("Args", "Raises"):
            parts += [f"**{section}:**", ""]
            parts += [f"- `{names}`: {_markdown(text)}" for names, text in _entries(lines)]
        elif section in ("Example", "Examples"):
            parts += [f"**{section}:**", "", "```pycon", _dedent(lines), "```"]
        elif section == "Returns":
            parts += ["**Returns:** " + _markdown(" ".join(line.strip() for line in lines if line.strip()))]
        else:
            parts += [_markdown(_dedent(lines))]
        parts.append("")
    return "\n".join(parts)


def render() -> str:
    """The whole of docs/api.md."""
    head = ["# grassfx API reference", "",
            "Generated from the docstrings by `python -m grassfx._apidoc > docs/api.md`; do not edit by hand",
            "(`tests/test_apidoc.py` fails when this file and the docstrings differ).", ""]
    head += [f"- [`{h}`](#{re.sub(r'[^a-z0-9]', '', h.lower())})" for h, _ in PUBLIC] + ["", ""]
    return "\n".join(head) + "\n".join(render_one(h, resolve(p)) for h, p in PUBLIC).rstrip("\n") + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
