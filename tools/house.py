"""Draw grassfx as a house: its floors, the imports between them, cycles and climbs.

    python tools/house.py            # the drawing (text), as in docs/architecture.md
    python tools/house.py --json     # the same facts as JSON

Reads the source only (``ast``; nothing is imported). Every import counts, at module level
or inside a function. A module sits on a floor; an arrow *runs up* when a module imports a
module on a higher floor, and *across* when it imports another room of its own floor
(the rooms of floors 1 and 2 do not know each other); a package's ``__init__`` re-exporting
its own modules is its front door, not an arrow. A *cycle* is a set of modules that import
each other, directly or around a loop. *An optimizer step's climbs*: the imports of the
modules an optimizer step runs (``grassfx.optim`` and what it imports, transitively) that
do not go down: up, across, or back into a module that imports them (a cycle).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"grassfx": ROOT / "grassfx", "grassfx.passes": ROOT / "passes", "grassfx.recipes": ROOT / "recipes"}

#: bottom to top; each floor's rooms (module name prefixes, the longest match wins)
FLOORS = [
    ("ground", ["grassfx.core", "grassfx._compat", "grassfx.errors", "grassfx.select", "grassfx.config",
                "grassfx.fsdp"]),
    ("parts", ["grassfx.instrument", "grassfx.passes", "grassfx.distributed"]),
    ("machines", ["grassfx.instrument.model", "grassfx.compiler", "grassfx.optim"]),
    ("front door", ["grassfx.api", "grassfx.debug", "grassfx"]),
    ("tools", ["grassfx.cli", "grassfx.train", "grassfx.recipes", "grassfx._apidoc", "grassfx.cost"]),
]
#: who may not import whom, beyond the floors: ``(importer prefix, allowed or forbidden, prefixes)``
RULES = [
    ("grassfx.passes", "only", ("grassfx.passes", "grassfx.core", "grassfx._compat", "grassfx.errors")),
    ("grassfx.compiler", "not", ("grassfx.instrument", "grassfx.optim", "grassfx.distributed", "grassfx.debug")),
    ("grassfx.instrument", "not", ("grassfx.compiler", "grassfx.optim", "grassfx.debug")),
    ("grassfx.optim", "not", ("grassfx.instrument.model", "grassfx.instrument.anchors",
                              "grassfx.instrument.experts", "grassfx.compiler", "grassfx.distributed",
                              "grassfx.debug")),
]
#: floors whose rooms must not know each other (the ground floor and the top ones may)
SEPARATE_ROOMS = (1, 2)


def modules() -> dict:
    """``{module name: path}`` of the library (grassfx/, and passes/ and recipes/, shipped as
    grassfx.passes and grassfx.recipes)."""
    found = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if package == "grassfx" and rel[0] in ("passes", "recipes"):
                continue  # links to the top-level folders, for in-tree runs
            parts = [package, *rel]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known) -> set:
    """The library modules ``name`` imports (anywhere in its body), resolved to modules:
    ``from a import b`` names ``a.b`` when that is a module, else ``a``."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def floor_of(name: str):
    """``(floor index, room)`` of a module: the longest room prefix that matches."""
    best = None
    for level, (_, rooms) in enumerate(FLOORS):
        for room in rooms:
            if (name == room or name.startswith(room + ".")) and (best is None or len(room) > len(best[1])):
                best = (level, room)
    return best


def _breaks(src: str, dst: str) -> bool:
    """Whether the import ``src -> dst`` breaks one of :data:`RULES`."""
    for importer, kind, prefixes in RULES:
        if src == importer or src.startswith(importer + "."):
            hit = dst.startswith(prefixes)
            if (kind == "only" and not hit) or (kind == "not" and hit):
                return True
    return False


def _front(src: str, dst: str, known) -> bool:
    """A package's ``__init__`` re-exporting its own modules (its front door, not an arrow)."""
    return known[src].name == "__init__.py" and dst.startswith(src + ".")


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return sorted(out)


def house() -> dict:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    circles = cycles(graph)
    in_cycle = {m: i for i, c in enumerate(circles) for m in c}
    up, across = [], []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if _front(src, dst, known):
                continue
            (fs, rs), (fd, rd) = floor_of(src), floor_of(dst)
            if fd > fs:
                up.append((src, dst))
            elif fd == fs and rs != rd and fs in SEPARATE_ROOMS:
                across.append((src, dst))
    broken = [(src, dst) for src, targets in sorted(graph.items()) for dst in sorted(targets) if _breaks(src, dst)]
    # an optimizer step: grassfx.optim and everything it imports
    step, todo = set(), [m for m in graph if m.startswith("grassfx.optim")]
    while todo:
        m = todo.pop()
        if m not in step:
            step.add(m)
            todo.extend(graph[m])
    climbs = []
    for src in sorted(step):
        for dst in sorted(graph[src]):
            (fs, rs), (fd, rd) = floor_of(src), floor_of(dst)
            looped = src in in_cycle and in_cycle[src] == in_cycle.get(dst)
            if fd > fs or (fd == fs and rs != rd and fs in SEPARATE_ROOMS) or looped:
                climbs.append((src, dst))
    rooms = {}
    for name in graph:
        level, room = floor_of(name)
        rooms.setdefault(level, {}).setdefault(room, []).append(name)
    return {"modules": len(graph), "imports": sum(len(v) for v in graph.values()), "rooms": rooms,
            "cycles": circles, "up": up, "across": across, "broken": broken, "step_modules": sorted(step), "climbs": climbs}


def _short(name: str) -> str:
    return name.removeprefix("grassfx.") if name != "grassfx" else "grassfx (package)"


def draw(h: dict) -> str:
    lines = []
    for level in range(len(FLOORS) - 1, -1, -1):
        rooms = h["rooms"].get(level, {})
        label = f"{level} {FLOORS[level][0]}"
        cells = [f"{_short(room)}({len(mods)})" for room, mods in sorted(rooms.items())]
        lines.append(f"{label:<13}| " + "  ".join(cells))
    lines.append("")
    lines.append(f"{h['modules']} modules, {h['imports']} imports (module- and function-level)")
    lines.append(f"cycles: {len(h['cycles'])}")
    for c in h["cycles"]:
        lines.append("  (" + " <-> ".join(_short(m) for m in c) + ")")
    lines.append(f"arrows running up: {len(h['up'])}")
    lines += [f"  {_short(a)} -> {_short(b)}" for a, b in h["up"]]
    lines.append(f"arrows across a floor: {len(h['across'])}")
    lines += [f"  {_short(a)} -> {_short(b)}" for a, b in h["across"]]
    lines.append(f"imports breaking a rule (RULES): {len(h['broken'])}")
    lines += [f"  {_short(a)} -> {_short(b)}" for a, b in h["broken"]]
    lines.append(f"an optimizer step: {len(h['step_modules'])} modules, climbs: {len(h['climbs'])}")
    lines += [f"  {_short(a)} -> {_short(b)}" for a, b in h["climbs"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    h = house()
    if args.json:
        h = dict(h, rooms={str(k): v for k, v in h["rooms"].items()})
        print(json.dumps(h, indent=1, default=list))
    else:
        print(draw(h))
    return 0


if __name__ == "__main__":
    sys.exit(main())
