"""Rendering a :class:`~grassfx.debug.diff.Diff`: a side-by-side HTML page and a DOT graph.

Both draw from the recorded node snapshots (each line of a stage is one node, with its
name and the names of its inputs), so nothing is parsed back from code.
"""

from __future__ import annotations

import collections
import difflib
import html
import json

__all__ = ["html_page", "dot_text"]

# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------
_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
table.code { border-collapse: collapse; width: 100%; table-layout: fixed; font-family: monospace; font-size: 12px; }
table.code td { padding: 0 4px; vertical-align: top; white-space: pre-wrap; word-break: break-all; }
td.no { width: 3em; color: #888; text-align: right; }
tr.skip td { color: #888; background: #f4f4f4; text-align: center; }
.created { background: #d4f7d4; } .erased { background: #f9d0d0; } .changed { background: #fff3bf; }
table.ops { border-collapse: collapse; margin: 0.5em 0 1em; } table.ops td, table.ops th { border: 1px solid #ccc; padding: 2px 8px; }
span.tag { color: #555; font-style: italic; }
"""

_CONTEXT = 3  # unchanged lines shown around each change


def html_page(d) -> str:
    """One self-contained HTML page: per graph, its op counts and a side-by-side table per pass."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>grassfx diff</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             "<h1>grassfx diff</h1>",
             '<p><span class="created">created by a pass</span> <span class="erased">erased by a pass</span> '
             '<span class="changed">changed (uses a rewritten value)</span></p>']
    for g in d.graphs:
        parts += _html_graph(g)
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _html_graph(g) -> list:
    esc = html.escape
    out = [f"<h2>{esc(g.graph_id)} ({esc(g.kind)})</h2>"]
    counts = g.changed_counts()
    if counts:
        out.append('<table class="ops"><tr><th>op</th><th>before</th><th>after</th></tr>')
        out += [f"<tr><td>{esc(k)}</td><td>{b}</td><td>{a}</td></tr>" for k, b, a in counts]
        out.append("</table>")
    for st in g.stages:
        if st.disabled or not st.modified:
            out.append(f"<h3>{esc(st.pass_name)}: {'disabled (GRASSFX_DISABLE)' if st.disabled else 'no change'}</h3>")
            continue
        out.append(f"<h3>{esc(st.pass_name)}: {len(st.created)} node(s) created, {len(st.erased)} erased</h3>")
        out.append('<table class="code">')
        out += _html_rows(st)
        out.append("</table>")
    return out


def _html_rows(st) -> list:
    rows = []
    matcher = difflib.SequenceMatcher(None, st.before, st.after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            rows += _html_equal(st, i1, i2, j1)
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            left = _html_cell(st, "before", i1 + k) if i1 + k < i2 else ("", "", "")
            right = _html_cell(st, "after", j1 + k) if j1 + k < j2 else ("", "", "")
            rows.append(_html_tr(left, right))
    return rows


def _html_equal(st, i1: int, i2: int, j1: int) -> list:
    n = i2 - i1
    keep = [k for k in range(n) if k < _CONTEXT or k >= n - _CONTEXT]
    if i1 == 0:
        keep = [k for k in keep if k >= n - _CONTEXT]
    if i2 == len(st.before):
        keep = [k for k in keep if k < _CONTEXT]
    rows, last = [], -1
    for k in keep:
        if k != last + 1:
            rows.append(f'<tr class="skip"><td colspan="4">{k - last - 1} unchanged line(s)</td></tr>')
        rows.append(_html_tr(_html_cell(st, "before", i1 + k, plain=True), _html_cell(st, "after", j1 + k, plain=True)))
        last = k
    if last != n - 1 and n:
        rows.append(f'<tr class="skip"><td colspan="4">{n - last - 1} unchanged line(s)</td></tr>')
    return rows


def _html_cell(st, side: str, i: int, plain: bool = False) -> tuple:
    line = (st.before if side == "before" else st.after)[i]
    name = st.name_of(line)
    made = st.erased if side == "before" else st.created
    text = html.escape(line)
    if plain:
        return str(i + 1), text, ""
    if name in made:
        verb = "erased" if side == "before" else "created"
        tag = html.escape(f"  # {st.pass_name} {verb} ({made[name]})")
        return str(i + 1), f'{text}<span class="tag">{tag}</span>', verb
    return str(i + 1), text, "changed"


def _html_tr(left: tuple, right: tuple) -> str:
    cells = []
    for no, text, cls in (left, right):
        attr = f' class="{cls}"' if cls and text else ""
        cells.append(f'<td class="no">{no}</td><td{attr}>{text}</td>')
    return f"<tr>{''.join(cells)}</tr>"


# ---------------------------------------------------------------------------------------
# DOT
# ---------------------------------------------------------------------------------------
def _changed_region(st):
    """A networkx DiGraph of created/erased nodes and their direct neighbours."""
    import networkx as nx

    g = nx.DiGraph()
    for side, snapshots, marked in (("before", st.before_nodes, st.erased), ("after", st.after_nodes, st.created)):
        nodes = {n.name: n for n in snapshots}
        users = collections.defaultdict(list)
        for n in snapshots:
            for src in n.inputs:
                users[src].append(n.name)
        for name in marked:
            if name not in nodes:
                continue
            status = "erased" if side == "before" else "created"
            _add_node(g, name, nodes[name].target, status, marked[name])
            for src in nodes[name].inputs:
                _add_node(g, src, nodes[src].target, None, None)
                g.add_edge(src, name)
            for dst in users[name]:
                _add_node(g, dst, nodes[dst].target, None, None)
                g.add_edge(name, dst)
    return g


def _add_node(g, name: str, op: str, status, weight) -> None:
    if name in g and (status is None or g.nodes[name].get("status")):
        return
    g.add_node(name, op=op, status=status, weight=weight)


_DOT_FILL = {"created": "#c8f0c8", "erased": "#f5c2c2", None: "#eeeeee"}


def _dot_id(*parts: str) -> str:
    return json.dumps("/".join(parts))  # a quoted DOT ID with escapes


def dot_text(d) -> str:
    """A DOT digraph: one cluster per graph and pass with its created/erased nodes and neighbours."""
    lines = ["digraph grassfx_diff {", "  rankdir=TB;", '  node [shape=box, style=filled, fontname="monospace"];']
    k = 0
    for gd in d.graphs:
        for st in gd.stages:
            if not (st.created or st.erased):
                continue
            region = _changed_region(st)
            prefix = f"{gd.graph_id}/{st.pass_name}"
            lines.append(f"  subgraph cluster_{k} {{")
            lines.append(f"    label={json.dumps(prefix)};")
            for name, attrs in region.nodes(data=True):
                label = f"{name}\\n{attrs['op']}" + (f"\\n{attrs['status']}: {attrs['weight']}" if attrs["status"] else "")
                label = label.replace('"', "'")
                lines.append(f'    {_dot_id(prefix, name)} [label="{label}", fillcolor="{_DOT_FILL[attrs["status"]]}"];')
            for src, dst in region.edges():
                lines.append(f"    {_dot_id(prefix, src)} -> {_dot_id(prefix, dst)};")
            lines.append("  }")
            k += 1
    lines.append("}")
    return "\n".join(lines) + "\n"
