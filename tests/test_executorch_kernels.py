"""edgec's kernels for ExecuTorch (runtimes/executorch_kernels.cpp) through real one-operator ExecuTorch
programs: attention (`llama::custom_sdpa`) against attention computed in float64 by torch, on the shapes a
decoder gives it (prefill, a chunk after earlier tokens, decode, grouped-query heads, head sizes 64, 96 and
128, key counts off the kernel's blocks), the calls it leaves to the stock kernel; the copies
(`slice_copy`, `update_cache`) against torch's, small and large enough for the thread pool; the switch
that turns them off."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from runtimes import executorch_kernels
from runtimes.executorch import load_op_libraries

load_op_libraries()
STATUS = executorch_kernels.status()
pytestmark = pytest.mark.skipif(
    not STATUS.startswith("edgec"),
    reason=f"edgec's ExecuTorch kernels are not in use here: {STATUS}")


def reference(q, k, v, start, causal, mask=None):
    """custom_sdpa's semantics in float64: query i sits at start + i; causal, it sees keys 0 .. start + i,
    otherwise keys 0 .. start + seq - 1, or with a mask the whole cache plus the mask; heads share kv heads
    in groups."""
    seq, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    keys = k.shape[1] if mask is not None else start + seq
    qh = q.double().transpose(1, 2)
    kh = k[:, :keys].double().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vh = v[:, :keys].double().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        positions = torch.arange(seq)[:, None] + start
        scores = scores.masked_fill(torch.arange(keys)[None, :] > positions, float("-inf"))
    if mask is not None:
        scores = scores + mask[:, :keys].double()
    return (scores.softmax(-1) @ vh).transpose(1, 2).float()


def one_op_program(max_seq, heads, kv_heads, head_dim, causal, with_mask=False, etdump=False, batch=1):
    """(the module with its cache, the loaded method). The method reads the program from bytes the module
    holds: keep the module while the method runs."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.randn(batch, max_seq, kv_heads, head_dim))
            self.register_buffer("v", torch.randn(batch, max_seq, kv_heads, head_dim))

        def forward(self, q, pos, mask=None):
            start = pos[0].item()
            torch._check_is_size(start)
            torch._check(start + q.shape[1] <= max_seq)
            return torch.ops.llama.custom_sdpa(q, self.k, self.v, start, mask, 0.0, causal, None)

    module = Attention()
    seq = torch.export.Dim("seq", min=1, max=max_seq - 1)
    args = (torch.randn(batch, 4, heads, head_dim), torch.tensor([0]))
    shapes = {"q": {1: seq}, "pos": None}
    if with_mask:
        args, shapes = args + (torch.zeros(4, max_seq),), dict(shapes, mask={0: seq})
    program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    lowered = to_edge_transform_and_lower(program, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    buffer = lowered.to_executorch().buffer
    module.program_bytes = buffer  # the loaded program reads from these bytes: they live as long as the module
    return module, _load_for_executorch_from_buffer(buffer, enable_etdump=etdump)


@pytest.mark.parametrize("heads,kv_heads,head_dim,causal", [
    (9, 3, 64, True),  # SmolLM2's attention
    (4, 4, 128, True),
    (12, 4, 96, True),  # Phi-3/4-mini's head size: eight and four accumulators
    (8, 2, 64, False),
])
def test_kernel_matches_float64_attention(heads, kv_heads, head_dim, causal):
    module, method = one_op_program(160, heads, kv_heads, head_dim, causal)
    torch.manual_seed(0)
    served_before = executorch_kernels.calls_served()
    # Prefill and chunks (keys transposed from 8 positions on), decode; rows left over in sets of 1 to 3.
    cases = [(128, 0), (7, 100), (1, 0), (1, 131), (33, 17), (5, 150), (18, 3), (8, 60)]
    for seq, start in cases:
        q = torch.randn(1, seq, heads, head_dim)
        got = method.forward((q, torch.tensor([start])))[0]
        want = reference(q, module.k, module.v, start, causal)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 2e-5, (seq, start)
    assert executorch_kernels.calls_served() - served_before == len(cases)


def test_decode_over_key_ranges_merges_to_whole_attention():
    """A decode step with few kv heads splits each one's keys in ranges (up to four here, one kv head, two
    threads) and merges their softmax partials; short contexts stay whole."""
    module, method = one_op_program(1100, 4, 1, 64, causal=True)
    served_before = executorch_kernels.calls_served()
    for start in (0, 63, 127, 128, 300, 1050):
        q = torch.randn(1, 1, 4, 64) * 3  # peaky scores: the ranges' maxima differ
        got = method.forward((q, torch.tensor([start])))[0]
        assert (got - reference(q, module.k, module.v, start, True)).abs().max().item() < 2e-5, start
    assert executorch_kernels.calls_served() - served_before == 6


def test_batches_and_the_largest_head_size():
    module, method = one_op_program(96, 8, 2, 256, causal=True, batch=2)
    served_before = executorch_kernels.calls_served()
    for seq, start in [(40, 0), (1, 50), (9, 60)]:
        q = torch.randn(2, seq, 8, 256)
        got = method.forward((q, torch.tensor([start])))[0]
        assert (got - reference(q, module.k, module.v, start, True)).abs().max().item() < 2e-5, (seq, start)
    assert executorch_kernels.calls_served() - served_before == 3


def test_a_nan_in_a_query_makes_its_row_nan_as_in_the_stock_kernel():
    module, method = one_op_program(64, 4, 2, 64, causal=True)
    q = torch.randn(1, 14, 4, 64)
    q[0, 12, 1, 7] = float("nan")  # position 15: sixteen keys, none in a scalar tail
    got = method.forward((q, torch.tensor([3])))[0]
    assert got[0, 12, 1].isnan().all()
    got[0, 12, 1] = 0
    want = reference(q.nan_to_num(), module.k, module.v, 3, True)
    want[0, 12, 1] = 0
    assert (got - want).abs().max().item() < 2e-5


def test_a_masked_call_goes_to_the_stock_kernel():
    module, method = one_op_program(64, 4, 2, 64, causal=False, with_mask=True)
    q = torch.randn(1, 6, 4, 64)
    mask = torch.zeros(6, 64)
    mask[:, 3] = float("-inf")
    served_before = executorch_kernels.calls_served()
    got = method.forward((q, torch.tensor([10]), mask))[0]
    assert executorch_kernels.calls_served() == served_before
    assert (got - reference(q, module.k, module.v, 10, False, mask)).abs().max().item() < 2e-5


def test_an_etdump_names_the_kernels_calls(tmp_path):
    """The kernel opens the operator's profiling scope, as the stock kernel's wrapper does: an ETDump of a
    program run through it names `llama::custom_sdpa.out`."""
    from executorch.devtools import Inspector

    module, method = one_op_program(64, 4, 2, 64, causal=True, etdump=True)
    served_before = executorch_kernels.calls_served()
    for _ in range(3):
        method.forward((torch.randn(1, 8, 4, 64), torch.tensor([0])))
    assert executorch_kernels.calls_served() - served_before == 3
    method.write_etdump_result_to_file(str(tmp_path / "run.etdp"))
    del method, module
    names = {event.name for block in Inspector(etdump_path=str(tmp_path / "run.etdp")).event_blocks
             for event in block.events}
    assert "llama::custom_sdpa.out" in names


def test_the_switch_leaves_the_stock_kernel_and_says_so():
    probe = ("import json; from runtimes.executorch import load_op_libraries; from runtimes import "
             "executorch_kernels as a; load_op_libraries(); print(json.dumps([a.status(), a.calls_served()]))")
    env = dict(os.environ, EDGEC_EXECUTORCH_KERNELS="stock")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    status, served = json.loads(out.stdout.strip().splitlines()[-1])
    assert status == "stock (EDGEC_EXECUTORCH_KERNELS=stock)" and served == 0


def test_the_build_is_cached_by_source_and_toolchain(tmp_path, monkeypatch):
    """A second build of the same source, executorch and compiler is the first one's file, not compiled
    again; another source is another file; nothing half-written is left."""
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    include, lib = executorch_kernels._executorch_dirs()
    first = executorch_kernels._build("g++", include, lib)
    built_at = first.stat().st_mtime_ns
    assert executorch_kernels._build("g++", include, lib) == first and first.stat().st_mtime_ns == built_at
    changed = tmp_path / "executorch_kernels.cpp"
    changed.write_text(executorch_kernels.SOURCE.read_text() + "\n// another revision\n")
    monkeypatch.setattr(executorch_kernels, "SOURCE", changed)
    assert executorch_kernels._build("g++", include, lib) != first
    assert platform.machine() == "x86_64" and not list((tmp_path / "kernels").glob("*.partial"))


def lowered(module, args, shapes):
    """(module, loaded method) of a program of `module`; the module keeps the program's bytes alive."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    buffer = to_edge_transform_and_lower(program, compile_config=EdgeCompileConfig(_check_ir_validity=False)) \
        .to_executorch().buffer
    module.program_bytes = buffer
    return module, _load_for_executorch_from_buffer(buffer)


@pytest.mark.parametrize("dim,start,end,step,served", [
    (2, 0, 9, 1, True),  # q of packed q/k/v heads
    (2, 12, None, 1, True),  # v: to the end
    (1, 3, -2, 1, True),  # along positions, a negative end
    (3, 8, 40, 1, True),  # within each row
    (2, 1, 13, 2, False),  # a step: the stock kernel's
    (2, -4, None, 1, True),  # a negative start
    (2, None, 2**63 - 1, 1, True),  # no start, the largest end
    (2, 10, 4, 1, True),  # end before start: empty
    (0, 0, 1, 1, True),  # the batch dim
])
def test_slice_copy_matches_torch(dim, start, end, step, served):
    class Slice(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten.slice_copy.Tensor(x, dim, start, end, step)

    seq = torch.export.Dim("seq", min=8, max=512)
    module, method = lowered(Slice(), (torch.randn(1, 8, 15, 64),), {"x": {1: seq}})
    for positions in (8, 300):  # 300 positions: a copy large enough for the pool
        x = torch.randn(1, positions, 15, 64)
        before = executorch_kernels.calls_served("slice_copy")
        got = method.forward((x,))[0]
        assert torch.equal(got, torch.ops.aten.slice_copy.Tensor(x, dim, start, end, step))
        assert executorch_kernels.calls_served("slice_copy") - before == int(served)


def test_update_cache_writes_the_chunk_at_its_position():
    class Cache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(1, 400, 3, 64))

        def forward(self, value, pos):
            start = pos[0].item()
            torch._check_is_size(start)
            torch._check(start + value.shape[1] <= 400)
            torch.ops.llama.update_cache(value, self.cache, start)
            return self.cache + 0.0

    seq = torch.export.Dim("seq", min=1, max=399)
    module, method = lowered(Cache(), (torch.randn(1, 4, 3, 64), torch.tensor([0])),
                             {"value": {1: seq}, "pos": None})
    want = torch.zeros(1, 400, 3, 64)
    before = executorch_kernels.calls_served("update_cache")
    for start, positions in ((0, 200), (200, 1), (201, 7), (392, 8)):  # 200 positions: on the pool
        value = torch.randn(1, positions, 3, 64)
        want[:, start:start + positions] = value
        assert torch.equal(method.forward((value, torch.tensor([start])))[0], want), (start, positions)
    assert executorch_kernels.calls_served("update_cache") - before == 4

