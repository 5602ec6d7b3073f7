"""onnxruntime's MatMulNBits kernels at a model's shapes: what the accuracy level and the block size cost in
prefill and decode, the bundle's other operators left out.

A stack of `--layers` layers of the five int4 linears of a decoder layer (q/k/v packed, o, gate, up, down;
random codes and scales, symmetric), run by onnxruntime on all cores for M = 1 (a decode step) and
M = `--prompt` (a prefill); medians of alternating rounds:

    python -m benchmarks.matmulnbits_kernels [--hidden 576 --intermediate 1536 --kv 192 --layers 30]
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.common import argument_parser, print_table, rerun_on_huge_pages


def stack(hidden: int, intermediate: int, kv: int, layers: int, block: int, accuracy_level: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    shapes = [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, intermediate), (hidden, intermediate),
              (intermediate, hidden)]
    rng = np.random.default_rng(0)
    nodes, initializers, x = [], [], "x"
    for layer in range(layers):
        outputs: list[str] = []
        for i, (k, n) in enumerate(shapes):
            blocks = -(-k // block)
            codes = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
            scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
            names = (f"w{layer}_{i}", f"s{layer}_{i}")
            initializers += [numpy_helper.from_array(codes, names[0]), numpy_helper.from_array(scales, names[1])]
            source = x if k == hidden else outputs[-1]  # down reads up's output: the chain has the right widths
            outputs.append(f"y{layer}_{i}")
            nodes.append(helper.make_node("MatMulNBits", [source, *names], [outputs[-1]], domain="com.microsoft",
                                          K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level))
        nodes.append(helper.make_node("Add", [x, outputs[-1]], [f"x{layer}"]))
        x = f"x{layer}"
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", hidden])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def run_ms(session, hidden: int, m: int, repeats: int) -> float:
    x = np.random.default_rng(1).standard_normal((m, hidden)).astype(np.float32) * 0.1
    session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    rerun_on_huge_pages()
    import os

    import onnxruntime as ort

    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="k (and v) projection width")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = [(32, 4), (32, 1), (64, 4), (64, 1), (128, 4)]  # (block, accuracy level)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    sessions = {v: ort.InferenceSession(stack(args.hidden, args.intermediate, args.kv, args.layers, *v), options,
                                        providers=["CPUExecutionProvider"]) for v in variants}
    samples: dict = {v: {"prefill": [], "decode": []} for v in variants}
    for round_index in range(args.rounds):
        for v in variants[round_index % len(variants):] + variants[: round_index % len(variants)]:
            samples[v]["prefill"].append(run_ms(sessions[v], args.hidden, args.prompt, 3))
            samples[v]["decode"].append(run_ms(sessions[v], args.hidden, 1, 30))
    base = {phase: statistics.median(samples[(32, 4)][phase]) for phase in ("prefill", "decode")}
    print(f"\nMatMulNBits only, {args.layers} layers of hidden {args.hidden}, intermediate {args.intermediate}; "
          f"{os.cpu_count()} threads, medians of {args.rounds} rounds\n")
    rows = []
    for block, level in variants:
        prefill, decode = (statistics.median(samples[(block, level)][p]) for p in ("prefill", "decode"))
        rows.append([block, level, f"{prefill:.1f}", f"{prefill / base['prefill']:.2f}x", f"{decode:.2f}",
                     f"{decode / base['decode']:.2f}x"])
    print_table(["block", "accuracy level", f"M={args.prompt} (ms)", "vs block 32 level 4", "M=1 (ms)",
                 "vs block 32 level 4"], rows)


if __name__ == "__main__":
    main()
