"""Every private or version-specific torch API grassfx uses, and nothing else.

A torch upgrade that breaks grassfx should break here: the rest of the library calls
these small functions and never touches ``torch._inductor``, ``torch._dynamo``,
``torch._functorch``, ``torch._guards``, private ``nn.Module`` / ``Tensor`` attributes
or the autograd engine directly (``tests/test_layout.py`` checks it).

Each function names what it wraps and why grassfx needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types

import torch

__all__ = [
    "custom_graph_pass_base", "post_grad_pre_passes", "user_post_grad_pre_pass", "compile_fx",
    "mode_options", "aot_autograd", "boxed", "own_code", "compile_caches_off", "graph_break_counts",
    "trace_artifact", "fake_mode_of", "op_schema", "op_name", "functional_all_reduce",
    "functional_wait", "all_reduce_mean", "queue_backward_callback", "called_by", "initializing_checkpoint_state", "version",
    "raw_parameter", "module_parameters", "set_class", "allocation_events", "fused_adamw",
    "foreach_momentum",
]


# -- Inductor, Dynamo, AOTAutograd ---------------------------------------------------------
def custom_graph_pass_base() -> type:
    """Inductor's ``CustomGraphPass``: a pass object with a ``uuid()`` for the FX graph cache."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def user_post_grad_pre_pass():
    """What the user set as Inductor's ``post_grad_custom_pre_pass`` (one pass, a list, a tuple or None)."""
    from torch._inductor import config

    return config.post_grad_custom_pre_pass


def post_grad_pre_passes(ours, user) -> tuple:
    """The value for ``post_grad_custom_pre_pass``: ``ours`` first, then the user's passes.

    Inductor (torch >= 2.8) takes a tuple and runs and hashes each entry; a user's pass may
    itself be one callable, a list or a tuple.
    """
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    return (ours, *get_custom_graph_passes(user))


def compile_fx(gm, example_inputs, config_patches: dict, cache_functions_of: str | None = None,
               cache_key: str = ""):
    """Inductor's compiler entry point with per-compile config patches.

    ``cache_functions_of``: a directory. When every custom ``autograd.Function`` in the
    Dynamo graph ``gm`` is grassfx's (a traced one applied from a file under it, an opaque
    one registered here and defined under it), the
    AOTAutograd cache may store and serve this graph; it refuses custom Functions by
    default. Two kinds are let in, for this one compile only (config patches):

    * Functions Dynamo traced (an ``autograd_function_apply`` node whose subgraphs hold
      their forward and backward, so both are in the graph the cache key hashes):
      ``autograd_cache_allow_custom_autograd_functions``;
    * Functions kept opaque (:func:`opaque_function`: one call node, Dynamo does not trace
      their bodies): each call node is pointed at the module-level function registered
      for its class (Dynamo's own target is a closure, which the cache key cannot name),
      and that function is marked cacheable under ``cache_key`` (grassfx passes its
      pipeline's uuid) and a hash of the source of the module defining it and its
      Function, so changed anchors never get an old graph.

    A graph holding any other custom Function (the user's own) keeps torch's defaults.
    """
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    scope = contextlib.nullcontext()
    cached = config_patches.get("fx_graph_cache", True)  # the AOTAutograd cache stores only with it
    kinds = _custom_functions(gm, cache_functions_of) if cached and cache_functions_of is not None else None
    if kinds:
        scope = functorch_config.patch(autograd_cache_allow_custom_autograd_functions=True)
        appliers = _point_at_appliers(gm)
        if appliers:
            marked = dict(config_patches.get("unsafe_marked_cacheable_functions", {}))
            marked.update({f"{fn.__module__}.{fn.__name__}": f"{cache_key}:{_source_hash(fn)}" for fn in appliers})
            config_patches = {**config_patches, "unsafe_marked_cacheable_functions": marked}
    with scope:
        return inductor_compile_fx(gm, example_inputs, config_patches=config_patches)


# the call node Dynamo makes for an autograd.Function it keeps opaque (allow_in_graph)
_TRAMPOLINE = "torch._dynamo.variables.misc.trampoline_autograd_apply"


_APPLIERS: dict = {}  # opaque autograd.Function class -> its module-level apply function


def opaque_function(cls, applier) -> None:
    """Let Dynamo put ``cls.apply`` (an autograd.Function) in its graph as one call, without
    tracing its forward and backward (they run when AOTAutograd traces the joint graph).

    ``applier``: a module-level function calling ``cls.apply`` with its arguments; compiled
    graphs call it instead of Dynamo's closure, so the AOTAutograd cache can name it.
    """
    import torch._dynamo

    torch._dynamo.allow_in_graph(cls)
    _APPLIERS[cls] = applier


def _function_class(target):
    """The autograd.Function class behind Dynamo's call node target for an opaque Function."""
    cells = [c.cell_contents for c in (getattr(target, "__closure__", None) or ())]
    classes = [c for c in cells if isinstance(c, type) and issubclass(c, torch.autograd.Function)]
    return classes[0] if len(classes) == 1 else None


def _point_at_appliers(gm) -> set:
    """Point Dynamo's call nodes of registered opaque Functions at their appliers; return those used."""
    used = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _qualname(node.target) == _TRAMPOLINE:
            applier = _APPLIERS.get(_function_class(node.target))
            if applier is not None:
                node.target = applier
                used.add(applier)
    if used:
        gm.recompile()
    return used


def _source_hash(fn) -> str:
    """Hash of the source of the module defining ``fn`` (and its Function): in the cache key."""
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(sys.modules[fn.__module__]).encode()).hexdigest()


def _qualname(target) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


def _custom_functions(gm, directory: str) -> set | None:
    """The kinds (``"traced"``, ``"opaque"``) of custom autograd Functions in ``gm``, or None
    when there are none or any of them is defined outside ``directory``."""
    from torch._functorch.autograd_function import AutogradFunctionApply

    root = os.path.join(os.path.realpath(directory), "")
    kinds = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target is torch.autograd.function.FunctionCtx:
            return None  # a Function whose ctx escaped into the graph: not one of ours
        if isinstance(target, AutogradFunctionApply):
            files = re.findall(r'File "([^"]+)"', node.meta.get("stack_trace") or "")
            if not files or not os.path.realpath(files[-1]).startswith(root):
                return None
            kinds.add("traced")
        elif _qualname(target) == _TRAMPOLINE:
            cls = _function_class(target)
            module = sys.modules.get(cls.__module__) if cls in _APPLIERS else None
            path = getattr(module, "__file__", None)
            if path is None or not os.path.realpath(path).startswith(root):
                return None
            kinds.add("opaque")
    return kinds or None


def load_inductor() -> None:
    """Import Inductor's compiler now (as ``torch.compile(backend="inductor")`` does when
    called), not inside the first training step that compiles."""
    import torch._inductor.compile_fx  # noqa: F401


def mode_options(mode, dynamic) -> dict:
    """The Inductor options ``torch.compile(mode=...)`` stands for."""
    import torch._inductor

    return torch._inductor.list_mode_options(mode, dynamic)


def aot_autograd(fw_compiler, bw_compiler, inference_compiler):
    """A Dynamo backend that partitions with AOTAutograd and hands each graph to a compiler."""
    from torch._dynamo.backends.common import aot_autograd as make_backend

    return make_backend(fw_compiler=fw_compiler, bw_compiler=bw_compiler, inference_compiler=inference_compiler)


def boxed(gm):
    """AOTAutograd's calling convention for a compiled graph (a list of inputs, freed as used)."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(gm)


def own_code(method):
    """``method`` bound to a private copy of its code object.

    Dynamo keeps compiled entries, and its recompile limit (8), per code object. Every
    GrassModel shares ``GrassModel._run``, so without a copy the fifth compiled model in a
    process (2 frames each) would silently run uncompiled.
    """
    fn = method.__func__
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(fresh, method.__self__)


def own_function(fn):
    """A copy of the plain function ``fn`` with a private copy of its code object (see
    :func:`own_code`: Dynamo's compiled entries and recompile limit go per code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def opaque_to_dynamo(fn):
    """``fn`` run as Python even inside a ``torch.compile`` of its caller.

    An outer ``torch.compile`` of a grassfx model (``torch.compile(model)``, the Hugging
    Face Trainer's ``torch_compile=True``) would otherwise trace grassfx's own forward:
    its anchors, refresh probes and step counter are Python state read once at trace time.
    Dynamo graph-breaks at the call instead; explicitly compiled functions called from
    ``fn`` (grassfx's own runner) still compile with their own backend.
    """
    return torch._dynamo.disable(fn, recursive=True)


@contextlib.contextmanager
def compile_caches_off():
    """Inductor's FX graph cache and the AOTAutograd cache off: every pass really runs."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False), \
            functorch_config.patch(enable_autograd_cache=False, enable_remote_autograd_cache=False):
        yield


def graph_break_counts() -> dict:
    """``{reason: count}`` of the graph breaks Dynamo has seen in this process."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def trace_artifact(name: str, payload_fn) -> None:
    """Put ``payload_fn()`` into a ``TORCH_TRACE`` log (tlparse shows it); free when tracing is off."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload_fn)


# -- FX graphs and ops --------------------------------------------------------------------
def fake_mode_of(values: list):
    """The fake-tensor mode the example values of a traced graph belong to (or None)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(values)


def op_schema(target):
    """The ``FunctionSchema`` of an ATen/custom op overload (None for plain callables)."""
    return getattr(target, "_schema", None)


def op_name(packet) -> str:
    """``"aten.cumsum"`` for an op overload packet."""
    return getattr(packet, "_qualified_op_name", str(packet)).replace("::", ".")


def functional_all_reduce():
    """The traceable all-reduce op (``_c10d_functional.all_reduce``) for graph rewrites."""
    return torch.ops._c10d_functional.all_reduce.default


def functional_wait():
    """The op that waits for a traceable collective's result."""
    return torch.ops._c10d_functional.wait_tensor.default


def all_reduce_mean(tensor: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """The mean of ``tensor`` over a process group, as a traceable functional collective."""
    import torch.distributed._functional_collectives as fcol

    return fcol.all_reduce(tensor, "sum", group_name) / world


# -- autograd engine and the Python stack ---------------------------------------------------
def queue_backward_callback(fn) -> None:
    """Run ``fn`` once the current backward pass has finished (as DDP's reducer does)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def backward_node():
    """The autograd node whose backward runs on this thread (while a reentrant checkpoint
    recomputes its region: that checkpoint's node, one per checkpoint call); None outside
    any backward."""
    return torch._C._current_autograd_node()


def called_by(class_name: str, depth: int = 12) -> bool:
    """True when a method of an object whose class (or a base) is named ``class_name``
    is among the ``depth`` callers of our caller (how DDP/FSDP wrapping is noticed)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if owner is not None and any(c.__name__ == class_name for c in type(owner).__mro__):
            return True
        frame = frame.f_back
    return False


def initializing_checkpoint_state(depth: int = 8) -> bool:
    """True when ``torch.distributed.checkpoint.state_dict._init_optim_state`` is among our
    caller's callers: it creates an empty optimizer's state by calling ``step()`` with zero
    gradients and lr 0 (a step grassfx must not count)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and "checkpoint" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


# -- nn.Module and Tensor internals ---------------------------------------------------------
def version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter."""
    return tensor._version


def module_parameters(module: torch.nn.Module) -> dict:
    """The module's own ``{name: Parameter}`` dict, bypassing attribute lookup (and properties)."""
    return module.__dict__["_parameters"]


def child_modules(module: torch.nn.Module) -> dict:
    """The module's own ``{name: submodule}`` dict, bypassing attribute lookup."""
    return module.__dict__["_modules"]


def raw_parameter(module: torch.nn.Module, name: str):
    """The Parameter registered as ``name``, even where a property shadows the attribute."""
    return module.__dict__["_parameters"][name]


def set_class(module: torch.nn.Module, cls: type) -> None:
    """Swap one module instance's class (as ``torch.nn.utils.parametrize`` does)."""
    module.__class__ = cls


def set_parameter_class(param: torch.nn.Parameter, cls: type) -> None:
    """Swap one Parameter instance's class (the tensor and its storage stay as they are).

    Dynamo keeps the shapes of parameters static only when ``type(p) is nn.Parameter``
    (``force_parameter_static_shapes``); a subclass would get symbolic shapes under
    ``dynamic=True`` (and a weight view by symbolic sizes the rewrite cannot push through),
    so the swapped Parameter is marked static explicitly, as a plain one is treated.
    """
    param.__class__ = cls
    if cls is not torch.nn.Parameter:
        torch._dynamo.mark_static(param)


def quiet_logging_calls():
    """A context in which Dynamo skips routine logging calls instead of breaking the graph.

    ``logging.Logger.debug``/``info`` and the ``warning_once``/``info_once`` methods some
    libraries (Hugging Face transformers) add to ``logging.Logger`` are neither traced
    nor run inside compiled frames (``torch._dynamo.config.ignore_logging_functions``);
    ``warning``/``error`` still break the graph and print.
    """
    import logging

    from torch._dynamo import config

    funcs = {logging.Logger.debug, logging.Logger.info}
    for name in ("warning_once", "info_once"):
        method = getattr(logging.Logger, name, None)
        if method is not None:
            funcs.add(method)
    return config.patch(ignore_logging_functions=set(config.ignore_logging_functions) | funcs)


def checkpoint_side_effects_once():
    """A context in which Dynamo traces a checkpointed region that mutates Python state from
    outside the region, applying the mutation once (in the forward) instead of breaking the
    graph (``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``).

    Hugging Face transformers' attention layers, with the ``kernels`` package installed (a
    dependency since transformers 5.25), set and reset a module-level context variable in
    every forward; without this, Dynamo runs each checkpointed layer uncompiled.
    """
    from torch._dynamo import config

    return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def dispatch_mode_base() -> type:
    """``TorchDispatchMode``: a context that sees every ATen op (explain counts GEMM tokens with it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def compiled_graph_count() -> int:
    """How many graphs Dynamo has handed to a backend in this process (all models)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def aot_cache_counts() -> dict:
    """This process's AOTAutograd cache outcomes so far: ``hit``, ``miss``, ``bypass``."""
    from torch._dynamo.utils import counters

    aot = counters["aot_autograd"]
    return {k: int(aot[f"autograd_cache_{k}"]) for k in ("hit", "miss", "bypass")}


def allocation_events(prof, device_type: str = "cpu") -> list:
    """``(time ns, bytes)`` of every allocation (> 0) and free (< 0) on ``device_type`` a finished
    ``torch.profiler.profile(profile_memory=True)`` recorded, in order.

    The public ``prof.events()`` folds memory events into the ops that made them; the
    kineto result list keeps each one (inside compiled graphs too: they allocate through
    the same c10 allocator).
    """
    kind = torch.device(device_type).type.upper()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith(kind)]
    return sorted(((e.start_ns(), e.nbytes()) for e in events), key=lambda pair: pair[0])


# -- optimizer kernels -----------------------------------------------------------------------
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")
_FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr: float, beta1: float, beta2: float,
                weight_decay: float, eps: float) -> bool:
    """``torch._fused_adamw_``: torch.optim.AdamW(fused=True)'s kernel, one pass per tensor.

    ``steps`` are float32 0-d tensors already advanced (torch's fused AdamW adds 1 before
    calling the kernel). Returns False, doing nothing, where the kernel does not exist or
    the tensors are not on one CPU/CUDA device with one float dtype, or a parameter's
    gradient and moments are laid out with other strides than it (the kernel walks the four
    tensors in memory order: a transposed weight's update would land on the wrong entries;
    the caller falls back).
    """
    kernel = getattr(torch, "_fused_adamw_", None)
    if kernel is None or not params:
        return False
    device, dtype = params[0].device, params[0].dtype
    if device.type not in _FUSED_ADAMW_DEVICES or dtype not in _FUSED_ADAMW_DTYPES:
        return False
    for group in (params, grads, exp_avgs, exp_avg_sqs):
        if any(t.device != device or t.dtype != dtype for t in group):
            return False
    for tensors in zip(params, grads, exp_avgs, exp_avg_sqs):
        if any(t.stride() != tensors[0].stride() for t in tensors):
            return False
    kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
           weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)
    return True


def foreach_add_scalar_(tensors: list, value: float) -> None:
    """``t += value`` for every tensor of ``tensors`` (one ``torch._foreach_add_`` call)."""
    torch._foreach_add_(tensors, value)


def foreach_momentum(bufs: list, grads: list, momentum: float, nesterov: bool) -> list:
    """``buf = momentum * buf + grad`` for every pair, in place, by ``torch._foreach_*`` (one
    call per list instead of two ops per tensor); returns the Nesterov directions
    ``grad + momentum * buf`` (new tensors) or ``bufs`` themselves. One device and dtype;
    ``momentum`` a float or a 0-d tensor."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    if not nesterov:
        return bufs
    if isinstance(momentum, torch.Tensor):  # a 0-d tensor (compiled callers: no recompile per value)
        return list(torch._foreach_add(grads, torch._foreach_mul(bufs, momentum)))
    return list(torch._foreach_add(grads, bufs, alpha=momentum))
