"""Does a module's ``forward`` multiply by one of its weights? Read from the code.

:func:`used_by_matmul` parses the forward (with :mod:`ast`) and follows the weight: a
use counts when the weight, or a local bound from it (``w = self.qkv.view(...)``,
``w_q, w_k = w.split(...)``, ``w[:d]``), is an operand of a matmul-like call
(``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``einsum``) or of ``@``.
When the weight is passed to another Python function (``F.multi_head_attention_forward(
..., self.in_proj_weight, ...)``), that function is resolved from the forward's globals
and followed the same way under the parameter the weight binds to, a few calls deep: so
weights used through functional helpers (``nn.MultiheadAttention``'s ``in_proj_weight``
and ``out_proj.weight``) are found without knowing the helper.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap

__all__ = ["used_by_matmul"]

_MATMULS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum", "addmv", "mv"})
#: methods whose result is still (a view or piece of) the weight
_LAYOUT = frozenset({"view", "reshape", "t", "T", "mT", "transpose", "permute", "unflatten", "contiguous", "to",
                     "split", "chunk", "unbind", "tensor_split", "narrow", "flatten", "squeeze", "unsqueeze",
                     "float", "half", "bfloat16", "type_as", "view_as", "reshape_as"})
_DEPTH = 4


def used_by_matmul(module, attr: str) -> bool:
    """Whether ``type(module).forward`` uses ``self.<attr>`` in a matmul (see the module docstring)."""
    forward = getattr(type(module), "forward", None)
    fn = _parse(forward) if forward is not None else None
    if fn is None or not fn.args.args:
        return False
    owner = fn.args.args[0].arg  # ``self`` by convention
    return _follows(forward, (owner, attr), _DEPTH, set())


def _parse(func):
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def _is_target(node, target, aliases: set) -> bool:
    """``node`` is the weight (``self.<attr>`` or the parameter name) or a local bound from it."""
    owner, attr = target
    if isinstance(node, ast.Attribute) and attr is not None and isinstance(node.value, ast.Name):
        return node.value.id == owner and node.attr == attr
    return isinstance(node, ast.Name) and (node.id in aliases or (attr is None and node.id == owner))


def _derived(node, target, aliases: set) -> bool:
    """``node`` evaluates to the weight or a view/piece of it."""
    while True:
        if _is_target(node, target, aliases):
            return True
        if isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _LAYOUT:
            node = node.func.value
        elif isinstance(node, ast.Attribute) and node.attr in ("T", "mT", "mH", "H"):
            node = node.value
        else:
            return False


def _names(target_node) -> list:
    if isinstance(target_node, ast.Name):
        return [target_node.id]
    if isinstance(target_node, (ast.Tuple, ast.List)):
        return [n for elt in target_node.elts for n in _names(elt)]
    if isinstance(target_node, ast.Starred):
        return _names(target_node.value)
    return []


def _aliases(fn, target) -> set:
    """Locals bound from the weight (to a fixed point: aliases of aliases count)."""
    aliases = set()
    assigns = [n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None]
    changed = True
    while changed:
        changed = False
        for node in assigns:
            if _derived(node.value, target, aliases):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for name in (n for t in targets for n in _names(t)):
                    if name not in aliases:
                        aliases.add(name)
                        changed = True
    return aliases


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _resolve(func_node, scope: dict):
    """The Python object a call's function expression names in ``scope`` (globals), or None."""
    parts = []
    while isinstance(func_node, ast.Attribute):
        parts.append(func_node.attr)
        func_node = func_node.value
    if not isinstance(func_node, ast.Name):
        return None
    obj = scope.get(func_node.id, getattr(builtins, func_node.id, None))
    for part in reversed(parts):
        obj = getattr(obj, part, None)
    return obj if inspect.isfunction(obj) else None


def _bound_parameter(callee, call: ast.Call, position) -> str | None:
    """The name of ``callee``'s parameter that argument ``position`` (index or keyword) binds to."""
    if isinstance(position, str):
        return position
    try:
        params = list(inspect.signature(callee).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[position].name if position < len(positional) else None


def _follows(func, target, depth: int, seen: set) -> bool:
    key = (getattr(func, "__code__", func), target)
    if key in seen:
        return False
    seen.add(key)
    fn = _parse(func)
    if fn is None:
        return False
    aliases = _aliases(fn, target)
    scope = getattr(func, "__globals__", {})
    for node in ast.walk(fn):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            if _derived(node.left, target, aliases) or _derived(node.right, target, aliases):
                return True
        if not isinstance(node, ast.Call):
            continue
        args = [(i, a) for i, a in enumerate(node.args) if not isinstance(a, ast.Starred)]
        args += [(k.arg, k.value) for k in node.keywords if k.arg is not None]
        used = [(pos, a) for pos, a in args if _derived(a, target, aliases)]
        if not used:
            continue
        if _call_name(node) in _MATMULS:
            return True
        callee = _resolve(node.func, scope) if depth > 0 else None
        if callee is None:
            continue
        for pos, _ in used:
            param = _bound_parameter(callee, node, pos)
            if param is not None and _follows(callee, (param, None), depth - 1, seen):
                return True
    return False
