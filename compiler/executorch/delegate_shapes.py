"""Output shapes of XNNPACK delegate calls worked out once per distinct partition, not once per call.

`to_executorch`'s SpecPropPass re-runs the whole program on fake tensors, and a delegate call there runs
its partition's original program again (unlifted anew each time). A stitched decoder's partitions differ
only in their weights, so the outputs of one stand for all of them: while `shared_delegate_shapes` is
active, a call whose partition graph and input shapes equal an earlier call's in the same shape
environment gets new fake tensors of that call's output shapes and strides, without running the graph.

ExecuTorch has no hook for this: the fake implementation torch registers for `executorch_call_delegate`
is swapped for one `to_executorch`. If those names ever move, delegate calls run as before (slower, same
result).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils import _pytree as pytree

from compiler.executorch.preprocess_cache import partition_signature


def _describe_argument(value) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), str(value.device), tuple(map(str, value.shape)),
                tuple(map(str, value.stride())))
    return repr(value)


def _fresh_like(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    return value


@contextlib.contextmanager
def shared_delegate_shapes(stats: dict | None = None):
    """While active, fake-tensor delegate calls reuse the outputs' shapes of an equal earlier call."""
    try:
        from torch._higher_order_ops.executorch_call_delegate import executorch_call_delegate
        from torch._higher_order_ops.utils import registered_hop_fake_fns
        original = registered_hop_fake_fns[executorch_call_delegate]
    except (ImportError, KeyError):
        yield
        return
    counts = stats if stats is not None else {}
    counts["shapes_reused"] = 0
    signatures: dict = {}  # lowered module -> its partition's signature (modules hash by identity)
    shape_envs: dict[int, object] = {}  # the shape environments whose ids key `outputs`, kept alive
    outputs: dict[tuple, tuple] = {}

    def fake_call(lowered_module, *args):
        shape_env = getattr(torch._guards.detect_fake_mode(args), "shape_env", None)
        shape_envs.setdefault(id(shape_env), shape_env)
        if lowered_module not in signatures:
            try:
                signatures[lowered_module] = (lowered_module.backend_id,
                                              partition_signature(lowered_module.original_module))
            except AttributeError:  # not a lowered module as ExecuTorch 1.5 makes them: run it
                return original(lowered_module, *args)
        key = (id(shape_env), signatures[lowered_module],
               tuple(_describe_argument(a) for a in pytree.tree_leaves(args)))
        if key in outputs:
            counts["shapes_reused"] += 1
            leaves, spec = outputs[key]
            return pytree.tree_unflatten([_fresh_like(leaf) for leaf in leaves], spec)
        result = original(lowered_module, *args)
        outputs[key] = pytree.tree_flatten(result)
        return result

    registered_hop_fake_fns[executorch_call_delegate] = fake_call
    try:
        yield
    finally:
        registered_hop_fake_fns[executorch_call_delegate] = original
