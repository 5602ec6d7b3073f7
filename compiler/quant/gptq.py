"""GPTQ: calibration-based int4 rounding that compensates each column's error on the columns after it.

For every Linear of the merged fp32 decoder, the Hessian proxy H = 2/n * sum(x x^T) of its inputs on
calibration text is collected (q/k/v and gate/up share their input and so their H, and are quantized as
one stacked matrix). Each weight [N, K] is then quantized column by column in the exact block format of
QuantizeWeightsPass (one scale per block of columns, set when the block starts, from the weights as
updated so far), and each column's rounding error is spread over the remaining columns (Frantar et al.,
2022), here through the Cholesky factor of H itself rather than of H^-1. The result is handed to the pass
as precomputed blocks.

Speed and memory: the calibration hidden states go through the decoder one window of layers at a time
(logits are never computed), so only one window's Hessians are held. Within a window, all matrices of one
shape go through one batched column loop, whose torch calls per window of columns cost dispatch time
rather than arithmetic at these sizes; a window's columns are rounded in one compiled call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compiler.errors import UsageError
from compiler.memory import outside_heap, release_module_pages, release_pages, trim_heap
from compiler.models.decoder import CanonicalDecoder, ConcatKVCache
from compiler.quant.blocks import absolute_max, block_scales_and_zeros, largest_dividing_block
from compiler.quant.cpu_linalg import (copy_transposed, fast_linears, gram, linear_bf16, matmul, reverse_cholesky,
                                      use_bf16)

# Varied general text (prose, dialogue, code, data, a few languages), written for edgec; users pass
# their own with --calibration, ideally text like their application's.
BUILTIN_CALIBRATION = Path(__file__).with_name("calibration.txt")
CALIBRATION_WINDOWS = 16  # of 128 tokens; the forward and the x x^T products grow linearly with it
HESSIAN_BUDGET_BYTES = 160 * 2**20  # Hessians held at once (one window of layers)
BATCH_ELEMENTS = 32 * 2**20  # weights in one batched column loop (fp32: 128 MiB)
# Rows are independent given H: matrices are cut into jobs of this many rows, so that a layer's matrices of
# one width (1B: q/k/v 3072 rows, o 2048, gate/up 16384) share batches: 2 column loops instead of 4.
ROWS_PER_JOB = 1024


def calibration_sequences(model_dir: Path, text_file: str | None, vocab_size: int, length: int = 128,
                          count: int = CALIBRATION_WINDOWS) -> list[list[int]]:
    """Calibration text through the model's tokenizer, cut into up to `count` windows of `length` tokens."""
    from tokenizers import Tokenizer

    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        raise UsageError(f"{model_dir}: --algo gptq (the int4 default) needs tokenizer.json to tokenize the "
                         "calibration text; add it or pass --algo rtn")
    text = Path(text_file or BUILTIN_CALIBRATION).read_text(errors="replace")
    ids = [i for i in Tokenizer.from_file(str(tokenizer_path)).encode(text).ids if i < vocab_size]
    if len(ids) < length:
        raise UsageError(f"{text_file or 'built-in calibration text'}: only {len(ids)} tokens; give at least {length}")
    if not text_file:
        ids *= -(-count * length // len(ids))  # the built-in text is short: repeat it to fill the windows
    step = max(length, (len(ids) - length) // count)
    return [ids[s : s + length] for s in range(0, len(ids) - length + 1, step)][:count]


class _HessianAccumulator:
    """H = 2/n * sum(x x^T) per module path, fed by forward pre-hooks or directly."""

    def __init__(self):
        self.hessians: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}  # max |x| per input channel, for channel smoothing
        self.counts: dict[str, int] = {}
        self.handles: list = []

    def hook(self, module: nn.Module, name: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _m, inputs: self.add(name, inputs[0])))

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        amax = absolute_max(x, 0)
        self.amax[name] = amax if name not in self.amax else torch.maximum(self.amax[name], amax)
        total = self.counts.get(name, 0) + x.shape[0]
        update = gram(x)
        h = self.hessians.get(name)
        # In place: down_proj's are 256 MiB at 1B
        h = update.mul_(2 / total) if h is None else h.mul_(self.counts[name] / total).add_(update, alpha=2 / total)
        self.hessians[name] = h
        self.counts[name] = total


# Linears that read the same input share one Hessian, and GPTQ treats rows independently given H, so
# they are quantized as one stacked matrix: one column loop instead of three (q/k/v) or two (gate/up).
SHARED_INPUT = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}
FOLLOWERS = {"k_proj", "v_proj", "up_proj"}


@dataclass
class _Leader:
    name: str  # the Linear whose input hooks collect H
    members: list[str]  # the Linears stacked by rows into one matrix (q/k/v, gate/up, or itself)
    weights: list[torch.Tensor]
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return sum(w.shape[0] for w in self.weights), self.weights[0].shape[1]

    def row_parts(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows start..stop of the stacked matrix, as views of the members' weights."""
        parts, offset = [], 0
        for w in self.weights:
            lo, hi = max(start - offset, 0), min(stop - offset, w.shape[0])
            if lo < hi:
                parts.append(w[lo:hi])
            offset += w.shape[0]
        return parts


def _leaders(model: CanonicalDecoder, block_size: int, symmetric: bool, skip: tuple[str, ...]) -> list[_Leader]:
    modules = dict(model.named_modules())
    leaders = []
    for name, module in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) or leaf in FOLLOWERS or name in skip:
            continue
        prefix = name[: -len(leaf)]
        members = [prefix + m for m in SHARED_INPUT.get(leaf, (leaf,))]
        block = block_size
        if name == "lm_head" and model.cfg.tie_word_embeddings:
            # A tied table is shared with the embedding at the block QuantizeWeightsPass gives it.
            block = largest_dividing_block(model.cfg.hidden_size, block_size) if symmetric else 0
            if not block:
                continue
        leaders.append(_Leader(name, members, [modules[m].weight.detach() for m in members], block))
    return leaders


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def _windows(model: CanonicalDecoder, leaders: list[_Leader], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[int]]:
    """Consecutive layers whose Hessians together fit `budget` bytes (at least one layer each)."""
    per_layer = defaultdict(int)
    for leader in leaders:
        per_layer[_layer_of(leader.name)] += leader.shape[1] ** 2 * 4
    windows, current, held = [], [], 0
    for i in range(model.cfg.num_layers):
        if current and held + per_layer[i] > budget:
            windows.append(current)
            current, held = [], 0
        current.append(i)
        held += per_layer[i]
    windows.append(current)
    return windows


def gptq_blocks(model: CanonicalDecoder, sequences: list[list[int]], bits: int, block_size: int,
                symmetric: bool, skip: tuple[str, ...] = (),
                progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, tuple]:
    """Module path -> precomputed (q [N, nb, bs], scales [N, nb], zero points [N, nb]) for every Linear
    (those named in `skip` excepted; a tied lm_head at its shared table's block), on onnxruntime's grid.
    progress(done, total): layers quantized, after each window of layers."""
    return gptq_codes(model, sequences, bits, [(block_size, "onnx")], symmetric, skip, progress)[(block_size, "onnx")]


def gptq_codes(model: CanonicalDecoder, sequences: list[list[int]], bits: int, wanted: list[tuple[int, str]],
               symmetric: bool, skip: tuple[str, ...] = (),
               progress: Callable[[int, int], None] = lambda done, total: None,
               hessian_budget: int = HESSIAN_BUDGET_BYTES,
               smoothing: float = 0.0,
               smoothing_log: dict[str, list[str]] | None = None) -> dict[tuple[int, str], dict[str, tuple]]:
    """gptq_blocks for several (block, grid) pairs (grids: compiler/quant/blocks.py) from one pass of the
    calibration text: the Hessians do not depend on the block or grid, only the column loops do.
    hessian_budget: the Hessians held at once, which sets how many layers one window takes.
    smoothing: alpha of compiler/quant/smooth.py, folded into `model` in place (the same function, other
    weights: the export must take them from `model`); 0 leaves the model as it is. smoothing_log: filled with
    the fold points "considered" and those "smoothed" (each named by the Linear that reads its input)."""
    leaders = {key: _leaders(model, key[0], symmetric, skip) for key in wanted}
    modules = dict(model.named_modules())
    by_layer = {key: defaultdict(list) for key in wanted}
    for key, listed in leaders.items():
        for leader in listed:
            by_layer[key][_layer_of(leader.name)].append(leader)
    hooked = {leader.name: leader for listed in leaders.values() for leader in listed}
    out: dict[tuple[int, str], dict[str, tuple]] = {key: {} for key in wanted}
    with torch.no_grad():
        ids = torch.tensor(sequences)
        positions = torch.arange(ids.shape[1])[None].expand_as(ids)
        x, ropes, mask = model.layer_inputs(ids, torch.ones_like(ids), positions, 0)
        empty = model.empty_cache(x.shape[0])[0]
        for window in _windows(model, list(hooked.values()), hessian_budget):
            hessians = _HessianAccumulator()
            for name, leader in hooked.items():
                if _layer_of(name) in window:
                    hessians.hook(modules[name], name)
            try:
                with fast_linears():
                    for i in window:
                        x = model.model.layers[i](x, ropes, ConcatKVCache(empty, empty, mask))
            finally:
                hessians.remove_hooks()
            if smoothing:
                considered, smoothed = _smooth_window(model, window, hessians, smoothing, leaders.values(), modules,
                                                      wanted[0][0])
                if smoothing_log is not None:
                    smoothing_log.setdefault("considered", []).extend(considered)
                    smoothing_log.setdefault("smoothed", []).extend(smoothed)
            last = window[-1] == model.cfg.num_layers - 1
            if last and "lm_head" in hooked:
                hessians.add("lm_head", model.model.norm(x))
                # The lm_head comes next with the build's peak (a tied table's pages): free heap pages go back first.
                trim_heap()
            for key in wanted:
                in_window = [leader for i in window for leader in by_layer[key][i]] + (by_layer[key][None] if last else [])
                out[key].update(_quantize_leaders(in_window, dict(hessians.hessians), bits, symmetric, grid=key[1],
                                                  overwrite=key == wanted[-1]))  # the Hessians' last use
            for i in window:  # done with until the export: their pages go back (see release_pages)
                release_module_pages(model.model.layers[i])
            progress(window[-1] + 1, model.cfg.num_layers)
    release_module_pages(model)  # the lm_head's
    return out


def _smooth_window(model: CanonicalDecoder, window: list[int], hessians: _HessianAccumulator, alpha: float,
                   leaders, modules: dict[str, nn.Module], block: int) -> tuple[list[str], list[str]]:
    """Channel smoothing of the window's layers after their calibration forward: the layers' outputs do not
    change, so the hidden states already computed for the next window stay valid. Returns the fold points
    considered and those smoothed."""
    from compiler.quant.smooth import FOLD_POINTS, map_from_scratch_file, smooth_layer

    considered, smoothed = [], []
    for i in window:
        considered += [name for leaf in FOLD_POINTS if (name := f"model.layers.{i}.{leaf}") in hessians.amax]
        layer = model.model.layers[i]
        before = list(layer.parameters())
        for name, s in smooth_layer(model, i, hessians.amax, alpha, hessians.hessians, block).items():
            smoothed.append(name)
            if name in hessians.hessians:  # H of x / s
                hessians.hessians[name] /= s[:, None] * s[None, :]
        now = {p.data_ptr() for p in layer.parameters()}
        map_from_scratch_file(layer, now - {p.data_ptr() for p in before})
        release_pages(*[p for p in before if p.data_ptr() not in now])  # the checkpoint's, read for the last time
    for listed in leaders:
        for leader in listed:
            if _layer_of(leader.name) in window:
                leader.weights = [modules[m].weight.detach() for m in leader.members]
    return considered, smoothed


def codes_for(precomputed: dict[str, tuple], module: str) -> tuple | None:
    """A module's precomputed codes; a packed qkv_proj's are q's, k's and v's stacked by rows."""
    if module in precomputed:
        return precomputed[module]
    if module.endswith(".qkv_proj"):
        parts = [precomputed.get(module.replace("qkv_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        if all(p is not None for p in parts):
            return tuple(np.concatenate(arrays, axis=0) for arrays in zip(*parts))
    return None


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, symmetric: bool):
    """One weight [N, K] and its H -> (q uint8 [N, nb, bs], scales [N, nb], zero points uint8 [N, nb])."""
    leader = _Leader("w", ["w"], [weight.detach()], block_size)
    return _quantize_leaders([leader], {"w": hessian}, bits, symmetric)["w"]


def _quantize_leaders(leaders: list[_Leader], hessians: dict[str, torch.Tensor], bits: int, symmetric: bool,
                      damp: float = 0.01, grid: str = "onnx", overwrite: bool = False) -> dict[str, tuple]:
    """Cuts the leaders into row jobs, runs jobs of equal shape in batches, and splits the results back
    per member. Pops the Hessians it has used; `overwrite`: they may be overwritten."""
    jobs = defaultdict(list)  # (rows, padded K, block) -> [(leader, start, stop)]
    for leader in leaders:
        n, k = leader.shape
        padded = -(-k // leader.block) * leader.block
        for start in range(0, n, ROWS_PER_JOB):
            stop = min(start + ROWS_PER_JOB, n)
            jobs[(stop - start, padded, leader.block)].append((leader, start, stop))
    factors: dict[str, tuple] = {}
    jobs_left = defaultdict(int)
    for group in jobs.values():
        for leader, _, _ in group:
            jobs_left[leader.name] += 1
    results: dict[tuple[str, int], tuple] = {}
    for (rows, padded, block), group in jobs.items():
        per_batch = max(1, BATCH_ELEMENTS // (rows * padded))
        # One weights buffer and one error history for all of this shape's batches: a fresh block of the same
        # size each batch would not fit the last one's place in the heap (see memory.reused_heap).
        batch_weights = torch.empty(min(per_batch, len(group)), padded, rows)
        history = error_history(batch_weights.shape)
        for b0 in range(0, len(group), per_batch):
            batch = group[b0 : b0 + per_batch]
            for leader, _, _ in batch:
                if leader.name not in factors:
                    factors[leader.name] = _error_feedback_factor(hessians.pop(leader.name), padded, damp, overwrite)
            # Weights transposed to [B, K, N]: the loop reads and updates whole columns, contiguous so.
            w = batch_weights[: len(batch)].zero_()
            for j, (leader, start, stop) in enumerate(batch):
                k, row = leader.shape[1], 0
                for part in leader.row_parts(start, stop):
                    copy_transposed(w[j, :k, row : row + part.shape[0]], part)
                    row += part.shape[0]
                dead = factors[leader.name][1]
                if dead.any():
                    w[j, dead] = 0
            # Each factor once, however many of the batch's row jobs share it (a 1B gate/up: 16).
            names = list(dict.fromkeys(leader.name for leader, _, _ in batch))
            feedback = torch.stack([factors[name][0] for name in names]) if len(names) > 1 \
                else factors[names[0]][0][None]  # a view: 8192 columns' factor is 256 MiB
            q, scales, zeros = _gptq_columns(w, feedback, bits, block, symmetric, grid=grid,
                                             factor_of=[names.index(leader.name) for leader, _, _ in batch],
                                             history=history[: len(batch)])
            del w, feedback
            for j, (leader, start, _) in enumerate(batch):
                results[(leader.name, start)] = (q[j], scales[j], zeros[j])
                jobs_left[leader.name] -= 1
                if not jobs_left[leader.name]:
                    del factors[leader.name]
    out = {}
    for leader in leaders:
        n = leader.shape[0]
        q, scales, zeros = (np.concatenate(p, axis=0, out=outside_heap((n, *p[0].shape[1:]), p[0].dtype)) for p in
                            zip(*[results.pop((leader.name, s)) for s in range(0, n, ROWS_PER_JOB)]))
        offset = 0
        for member, weight in zip(leader.members, leader.weights):
            rows = slice(offset, offset + weight.shape[0])
            out[member] = (q[rows], scales[rows], zeros[rows])
            offset += weight.shape[0]
    return out


def _error_feedback_factor(hessian: torch.Tensor, k: int, damp: float,
                           overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """F, upper triangular with unit diagonal, for H padded to k columns, and the mask of dead inputs.
    `overwrite`: F may be made in H's own memory (8192 columns: 256 MiB not copied).

    GPTQ's column loop with U the upper Cholesky factor of H^-1 ends with w - q = e U (e: the scaled
    errors). With H = R R^T, R upper (one Cholesky of H reversed), U = R^-1, so e = (w - q) R, and the
    value column i is rounded from is w_i + sum_{j<i} (w_j - q_j) R_ji / R_ii: F = R / diag(R) by
    columns. The same result as with H^-1's factor, without inverting anything (a triangular inverse of
    8192 columns costs three Cholesky factorizations)."""
    k_real = hessian.shape[0]
    if overwrite and k == k_real:
        h = hessian
    else:
        h = torch.zeros(k, k)
        h[:k_real, :k_real] = hessian
    diagonal = h.diagonal()
    dead = diagonal == 0
    # Padding columns and unused inputs have H_ii = 0: a unit diagonal keeps H invertible, and their
    # weights are zeroed, so they stay exactly zero.
    diagonal[dead] = 1
    diagonal += damp * torch.mean(diagonal)
    upper = reverse_cholesky(h)
    del h
    return upper.div_(upper.diagonal().clone()), dead


def _group_shifts(feedback: torch.Tensor, factor_of: list[int], history: torch.Tensor, o1: int,
                  o2: int) -> torch.Tensor:
    """F[:o1, o1:o2]^T @ E[:o1] for each matrix of the batch: the earlier columns' errors summed into a
    group's columns. A factor's slice is made ready once for all the matrices that share it."""
    ready: dict[int, torch.Tensor] = {}
    shifts = []
    for j, u in enumerate(factor_of):
        if u not in ready:
            f = feedback[u, :o1, o1:o2]
            # fp32: both copies, as oneDNN is slower with a transposed left operand (7.6 against 6.2 ms at 1B's
            # down_proj), and a column slice transposed in one copy costs 1.3 ms against 0.3 for the two.
            ready[u] = f.T.to(torch.bfloat16).contiguous() if history.dtype == torch.bfloat16 \
                else f.contiguous().T.contiguous()
        shifts.append(linear_bf16(ready[u], history[j, :o1].T) if history.dtype == torch.bfloat16
                      else matmul(ready[u], history[j, :o1]))
    return torch.stack(shifts)


def error_history(shape) -> torch.Tensor:
    """Room for (w - q) of every column of a batch [B, K, N], by rows, for the groups' products: in bf16 where
    those run in bf16 (`use_bf16`; they add the shift's rounding noise, relative 2^-9, to values rounded to
    4 bits)."""
    return torch.empty(shape, dtype=torch.bfloat16 if use_bf16() else torch.float32)


def _gptq_columns(w: torch.Tensor, feedback: torch.Tensor, bits: int, block_size: int, symmetric: bool,
                  lazy: int = 32, grid: str = "onnx", outer: int = 128, factor_of: list[int] | None = None,
                  history: torch.Tensor | None = None):
    """The GPTQ column loop over a batch: w [B, K, N], feedback [U, K, K] (_error_feedback_factor), the
    factor of matrix j being feedback[factor_of[j]] (by default U = B, one each).
    Returns numpy (q uint8 [B, N, nb, bs], scales [B, N, nb], zero points uint8 [B, N, nb]).

    Column i is rounded from w_i + sum_{j<i} (w_j - q_j) F_ji, the sum gathered in `shift` while w keeps
    the original weights. Columns go in groups of `outer`: a group's shift starts as one product over every
    earlier column's error (left-looking: a fresh [outer, N] result, which oneDNN computes at about 1.7x
    MKL's rate on AMD, where adding a rank-`outer` update into all later columns could not use it); within the
    group each column's error goes to the rest of its `lazy` window at once and to the group's later windows
    in one batched product per window. A window's columns are rounded in one compiled call
    (compiler/quant/gptq_window.py)."""
    from compiler.quant.gptq_window import round_window  # numba (0.3 s to import) only where GPTQ runs

    b, k, n = w.shape
    factor_of = list(range(b)) if factor_of is None else factor_of
    which = torch.tensor(factor_of)
    nb = k // block_size
    lazy = math.gcd(lazy, block_size)  # every block starts a window: its scale needs the shift complete
    outer = -(-outer // block_size) * block_size  # whole blocks, so a block never straddles two groups
    q_rows = outside_heap((b, n, k), np.uint8)  # held until the leaders' rows are joined
    scales = torch.empty(b, nb, n)
    zeros = torch.empty(b, nb, n)
    qmax = np.float32(2**bits - 1)
    # (w - q) of every column so far (`error_history`); the current group's errors in fp32, for its own windows.
    history = error_history((b, k, n)) if history is None else history
    if history.dtype == torch.bfloat16:
        history_bf16, history_fp32 = history.view(torch.int16).numpy().view(np.uint16), np.empty((0, 0, 0), np.float32)
    else:
        history_bf16, history_fp32 = np.empty((0, 0, 0), np.uint16), history.numpy()
    errors = torch.empty(b, min(outer, k), n)
    w_columns, feedback_rows, error_rows, which_rows = w.numpy(), feedback.numpy(), errors.numpy(), which.numpy()
    for o1 in range(0, k, outer):
        o2 = min(o1 + outer, k)
        shift = torch.zeros(b, o2 - o1, n) if o1 == 0 else \
            _group_shifts(feedback, factor_of, history, o1, o2)
        # F_bb^-T of the group's blocks, for their scales: one batched solve, not a small solve at every block.
        diagonal = torch.stack([feedback[:, c : c + block_size, c : c + block_size]
                                for c in range(o1, o2, block_size)], 1)
        block_solves = torch.linalg.solve_triangular(diagonal.transpose(2, 3),
                                                     torch.eye(block_size).expand_as(diagonal), upper=False,
                                                     unitriangular=True)
        for i1 in range(o1, o2, lazy):
            i2 = min(i1 + lazy, o2)
            if i1 % block_size == 0:
                # Same rule as the RTN path, on the block as GPTQ has updated it so far (blocks along K: axis 1
                # here); blocks start windows. The shift holds partial sums that are right only for the column
                # being rounded; for the rest of the block the classic loop's values are w + F_bb^-T shift.
                end = i1 + block_size
                block = torch.baddbmm(w[:, i1:end], block_solves[which, (i1 - o1) // block_size],
                                      shift[:, i1 - o1 : end - o1])
                scale, zero = block_scales_and_zeros(block, bits, symmetric, grid=grid, dim=1)
                scales[:, i1 // block_size], zeros[:, i1 // block_size] = scale, zero
                grid_args = [t.contiguous().numpy() for t in
                             (scale, zero, 1 / torch.where(scale == 0, 1.0, scale), zero * scale)]
            round_window(w_columns, shift.numpy(), feedback_rows, which_rows, i1, i2, o1, *grid_args, qmax, q_rows,
                         error_rows, history_bf16, history_fp32)
            if i2 < o2:
                shift[:, i2 - o1 :].baddbmm_(feedback[which, i1:i2, i2:o2].transpose(1, 2), errors[:, i1 - o1 : i2 - o1])
    scales_out, zeros_out = outside_heap((b, n, nb), np.float32), outside_heap((b, n, nb), np.uint8)
    np.copyto(scales_out, scales.transpose(1, 2).numpy())
    np.copyto(zeros_out, zeros.transpose(1, 2).numpy(), casting="unsafe")
    return q_rows.reshape(b, n, nb, block_size), scales_out, zeros_out
