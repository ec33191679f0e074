"""The grassfx pass pipeline (shipped as ``grassfx.passes``).

Passes run on each post-grad graph (Inductor) or AOTAutograd graph (``aot_eager``), in
this order. ``GRASSFX_DISABLE=name,...`` skips passes by name.
"""

from __future__ import annotations

from .compact_embedding_grad import compact_embedding_grad
from .compress_allreduce import compress_allreduce
from .infra import ALL_REDUCE, Change, PassContext, PassResult, Settings, Skip, settings
from .sparsify_wgrad import sparsify_wgrad

# The pipeline, in order.
#  1. sparsify_wgrad must run first: it replaces every grassfx::rowsel marker (later
#     passes and Inductor lowering never see the marker op) and marks the compressed
#     gradients it produces.
#  2. compress_allreduce reduces exactly the nodes sparsify_wgrad marked, so it must run
#     after it; it is a no-op unless the model trains data-parallel.
#  3. compact_embedding_grad is independent of both (it touches only the float32
#     accumulator Inductor's decomposition makes for a bf16/fp16 embedding's gradient).
PIPELINE = (sparsify_wgrad, compress_allreduce, compact_embedding_grad)

__all__ = ["PIPELINE", "ALL_REDUCE", "Change", "PassContext", "PassResult", "Settings", "Skip", "settings", "sparsify_wgrad", "compress_allreduce", "compact_embedding_grad"]
