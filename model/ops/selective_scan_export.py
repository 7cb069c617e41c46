# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""Selective scan for export (backend ``export``): plain tensor ops in PyTorch, one ONNX ``Scan`` in ONNX.

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t``, ``y_t = C_t . h_t + D * u_t`` has two
exportable forms here, both free of custom operators:

**PyTorch ops** (:func:`selective_scan_export`, what eager PyTorch, TorchScript and the
``dynamo`` ONNX exporter see): a blocked scan in Split, Mul, Exp, Add, MatMul, CumSum, Concat
and Reshape, a few hundred nodes per scan whatever the length:

1. the sequence is cut into chunks of ``T`` steps (``CHUNK``; zero-padded at the end);
2. all chunks at once, the recurrence runs from a zero state over the ``T`` steps of its
   chunk (``T`` unrolled steps, each on a tensor holding one step of every chunk), decays
   and inputs formed on the fly and each state reduced over N at once, so no ``[L, ..., N]``
   tensor is ever materialised (peak memory about ``1/T`` of the full state sequence);
3. the chunk-end states are carried across chunks by :func:`blocked_scan` (the same idea on
   the ``L / T`` chunk ends, recursively, with log decay ``A * sum(delta over the chunk)``);
4. each output gets the carried state's share ``C_t . (exp(A * cumsum(delta)_t) * carry)``.

**ONNX** (the tracing exporter, inside :func:`onnx_placeholders`): each scan is traced as one
placeholder node, which :func:`expand_onnx_placeholders` replaces by :func:`scan_onnx_nodes`:
one standard ONNX ``Scan`` operator that runs the recurrence step by step over time, ``S``
steps per iteration (:data:`STEPS_PER_ITERATION`), on a ``[b, K, N, d]`` state that stays in
cache. It does what the fused ``cpu`` kernel does, one exponential per state update, where the
blocked form needs two and about twice the passes over memory, each over tensors too large for
the cache; it measured 3x faster in onnxruntime (docs/deploy.md). Tracing records only the
placeholder, not the scan's intermediate tensors, so exporting also takes far less memory.

Every exponent taken is a log decay ``delta * A`` (summed over steps in the blocked form), <= 0
since ``A < 0`` and ``delta > 0`` (after softplus): nothing can overflow, unlike formulations with
``exp(-cumsum)``. The PyTorch form is differentiable (plain autograd) but meant for inference;
training uses ``cpu``, ``triton`` or ``mamba_ssm``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from model.ops.scan_reference import finish_outputs, inverse_permutations, prepare_inputs

CHUNK = 16
STEPS_PER_ITERATION = 8  # scan steps per iteration of the ONNX Scan (8 measured best of 1, 4, 8, 16)
ONNX_DOMAIN = "mambaad"
ONNX_OP = "SelectiveScan"


def _sequential(log_a: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``h_t = exp(log_a_t) * h_{t-1} + x_t`` along ``dim`` (short, unrolled), ``h_{-1} = 0``."""
    # split (not unbind) keeps the step axis: no Squeeze/Unsqueeze nodes in the exported graph
    decays = torch.exp(log_a).split(1, dim)
    inputs = x.split(1, dim)
    h = inputs[0]
    states = [h]
    for a_t, x_t in zip(decays[1:], inputs[1:]):
        h = a_t * h + x_t
        states.append(h)
    return torch.cat(states, dim)


def blocked_scan(log_a: torch.Tensor, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Solve ``h_t = exp(log_a_t) * h_{t-1} + x_t`` along dim 0 (``h_{-1} = 0``), ``log_a <= 0``.

    ``log_a`` and ``x`` have the same shape ``[L, ...]``; returns ``h`` of that shape.
    """
    length = log_a.shape[0]
    if length <= chunk:
        return _sequential(log_a, x, 0)
    n_chunks = (length + chunk - 1) // chunk  # positive operands: ONNX integer Div truncates
    pad = n_chunks * chunk - length
    if pad:
        # padded steps (decay 1, input 0) follow the real ones, so they cannot change them
        log_a = torch.cat([log_a, log_a.new_zeros((pad, *log_a.shape[1:]))])
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    rest = log_a.shape[1:]
    log_a = log_a.reshape(n_chunks, chunk, *rest)
    x = x.reshape(n_chunks, chunk, *rest)
    local = _sequential(log_a, x, 1)
    cum = torch.cumsum(log_a, 1)
    ends = blocked_scan(cum[:, -1], local[:, -1], chunk)
    entering = torch.cat([ends.new_zeros((1, *rest)), ends[:-1]])
    h = local + torch.exp(cum) * entering.unsqueeze(1)
    h = h.reshape(n_chunks * chunk, *rest)
    return h[:length] if pad else h


def _pad_steps(t: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t


def _chunked_outputs(
    delta_t: torch.Tensor,
    du_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """``y_t = C_t . h_t`` for the S6 recurrence, ``[L, b, K, d]``, without any ``[L, ..., N]`` tensor.

    Inputs are time-major: ``delta_t``, ``du_t`` (delta * u) ``[L, b, K, d]``, ``A [K, d, N]``,
    ``B_t [L, b, K, 1, N]``, ``C_t [L, b, K, N, 1]``. Every chunk runs the recurrence from a
    zero state, one step at a time for all chunks at once, forming decays and inputs on the fly
    and reducing each state over N at once; the chunk-end states are carried across chunks by
    :func:`blocked_scan` (1/T of the full size); each output then gets the carried state's
    share ``C_t . (exp(A * cumsum(delta)_t) * carry)``, again one step at a time.
    """
    length = delta_t.shape[0]
    chunk = min(chunk, length)
    n_chunks = (length + chunk - 1) // chunk  # positive operands: ONNX integer Div truncates
    pad = n_chunks * chunk - length
    # padded steps (delta 0: decay 1, input 0; C 0) follow the real ones and are cut off
    delta_c, du_c, B_c, C_c = (
        _pad_steps(t, pad).reshape(n_chunks, chunk, *t.shape[1:]) for t in (delta_t, du_t, B_t, C_t)
    )
    C_steps = C_c.split(1, 1)
    h = None
    outputs = []
    for d_s, du_s, b_s, c_s in zip(delta_c.split(1, 1), du_c.split(1, 1), B_c.split(1, 1), C_steps):
        x = du_s[..., None] * b_s  # [n, 1, b, K, d, N]
        h = x if h is None else torch.exp(d_s[..., None] * A) * h + x
        outputs.append(torch.matmul(h, c_s))
    y = torch.cat(outputs, 1)
    if n_chunks > 1:
        cum = torch.cumsum(delta_c, 1)  # A * cum is the log decay since the chunk began (<= 0)
        ends = blocked_scan(cum[:, -1, ..., None] * A, h[:, 0], chunk)
        carry = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]]).unsqueeze(1)
        shares = [
            torch.matmul(torch.exp(cum_s[..., None] * A) * carry, c_s)
            for cum_s, c_s in zip(cum.split(1, 1), C_steps)
        ]
        y = y + torch.cat(shares, 1)
    y = y.reshape(n_chunks * chunk, *y.shape[2:-1])
    return y[:length] if pad else y


def _selective_scan_blocked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The blocked form (module docstring, steps 1-4), ``[b, K*d, L] -> [b, K*d, L]``."""
    u_t, delta_t, A, B_t, C_t = prepare_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus)
    y_t = _chunked_outputs(delta_t, delta_t * u_t, A, B_t, C_t, chunk)
    return finish_outputs(y_t, u_t, D)


_placeholder_depth = 0


@contextlib.contextmanager
def onnx_placeholders() -> Iterator[None]:
    """While active, a traced :func:`selective_scan_export` becomes one ``mambaad::SelectiveScan`` node.

    For the tracing ONNX exporter (``torch.onnx.export(..., dynamo=False,
    custom_opsets={ONNX_DOMAIN: 1})``); :func:`expand_onnx_placeholders` then replaces every
    placeholder by standard operators. Outside tracing nothing changes.
    """
    global _placeholder_depth
    _placeholder_depth += 1
    try:
        yield
    finally:
        _placeholder_depth -= 1


class _Placeholder(torch.autograd.Function):
    """One node standing for a whole scan in the traced graph; its value is the real scan's."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, length, groups, d_state, channels):
        # the value only feeds the rest of the trace: take the fastest backend here
        if u.device.type == "cpu":
            from model.ops import selective_scan_cpu  # imports numba: only when tracing on a CPU

            if selective_scan_cpu.NUMBA_AVAILABLE:
                return selective_scan_cpu.selective_scan_cpu(u, delta, A, B, C, D, delta_bias, delta_softplus)
        return _selective_scan_blocked(u, delta, A, B, C, D, delta_bias, delta_softplus)

    @staticmethod
    def symbolic(g, u, delta, A, B, C, D, delta_bias, delta_softplus, length, groups, d_state, channels):
        y = g.op(
            f"{ONNX_DOMAIN}::{ONNX_OP}",
            u,
            delta,
            A,
            B,
            C,
            D,
            delta_bias,
            delta_softplus_i=int(delta_softplus),
            length_i=length,
            groups_i=groups,
            d_state_i=d_state,
            channels_i=channels,
        )
        y.setType(u.type())
        return y


def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Selective scan ``[b, K*d, L] -> [b, K*d, L]`` (fp32); same contract as
    :func:`model.ops.selective_scan.selective_scan_fn`.

    Computed by the blocked form (:func:`_chunked_outputs`); traced inside
    :func:`onnx_placeholders`, one placeholder node instead (see the module docstring).
    """
    if _placeholder_depth and torch.jit.is_tracing():
        u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
        channels = u.shape[1]
        D = u.new_zeros(channels) if D is None else D.float()
        delta_bias = u.new_zeros(channels) if delta_bias is None else delta_bias.float()
        # int(): static sizes, attributes of the placeholder (the batch stays dynamic)
        sizes = (int(u.shape[2]), int(B.shape[1]), int(A.shape[1]), int(A.shape[0]))
        return _Placeholder.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), *sizes)
    return _selective_scan_blocked(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk)


def gather_scan_encode(x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """:func:`model.ops.scan_reference.scan_encode` (``[B, C, H, W] -> [B, K, C, L]``) as one Gather of whole
    channel vectors (channels-last): the same values; in onnxruntime about 2x faster than
    GatherElements on a K-fold expanded copy, which is how ``torch.gather`` exports."""
    b, c = x.shape[:2]
    k, length = perms.shape
    rows = x.reshape(b, c, length).transpose(1, 2)  # [B, L, C]
    return rows[:, perms.reshape(-1)].reshape(b, k, length, c).transpose(2, 3)


def gather_scan_decode(y: torch.Tensor, perms: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """:func:`model.ops.scan_reference.scan_decode` (``[B, K, C, L] -> [B, C, H*W]``, un-permute and sum over
    directions) as one Gather of channel vectors, like :func:`gather_scan_encode`."""
    b, k, c, length = y.shape
    if perms.shape != (k, length) or h * w != length:
        raise ValueError(f"perms {tuple(perms.shape)} / grid {h}x{w} do not match sequences {tuple(y.shape)}")
    inv = inverse_permutations(perms.to(y.device))
    flat = (inv + torch.arange(k, device=y.device)[:, None] * length).reshape(-1)  # index into K*L rows
    rows = y.transpose(2, 3).reshape(b, k * length, c)
    return rows[:, flat].reshape(b, k, length, c).sum(1).transpose(1, 2)


class _OnnxNodes:
    """ONNX nodes under one name prefix; constants are ``Constant`` nodes, valid in any (sub)graph."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> Any:
        """Add a node; returns its output name, or the list of names when ``outputs > 1``."""
        from onnx import helper

        names = [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, values: Any, dtype: type = np.float32) -> str:
        from onnx import numpy_helper

        return self.op("Constant", [], value=numpy_helper.from_array(np.asarray(values, dtype)))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def split(self, x: str, parts: int, axis: int) -> list[str]:
        return [x] if parts == 1 else self.op("Split", [x], outputs=parts, axis=axis)


def steps_per_iteration(length: int, most: int = STEPS_PER_ITERATION) -> int:
    """The largest divisor of ``length`` that is at most ``most`` (no padding needed)."""
    return max(s for s in range(1, min(most, length) + 1) if length % s == 0)


def _softplus(g: _OnnxNodes, x: str) -> str:
    """``max(x, log(1 + exp(min(x, 20))))``: PyTorch's softplus (``x`` above 20) within float32
    rounding, without onnxruntime's ``Softplus`` kernel, which measured 10x slower than Exp."""
    exp = g.op("Exp", [g.op("Min", [x, g.const(20.0)])])
    return g.op("Max", [x, g.op("Log", [g.op("Add", [exp, g.const(1.0)])])])


def _scan_body(
    prefix: str,
    steps: int,
    groups: int,
    d_inner: int,
    d_state: int,
    softplus: bool,
    constants: dict[str, np.ndarray] | None,
) -> Any:
    """Body of the ONNX ``Scan``: ``steps`` recurrence steps on the state ``h [1, b, K, N, d]``.

    Scanned inputs per iteration: ``z`` (delta before softplus) and ``u`` ``[S, b, K, 1, d]``,
    ``B [S, b, K, N, 1]``, ``C [S, b, K, 1, N]``; output ``y [S, b, K, 1, d]`` with the skip
    term. ``A [K, N, d]``, the delta bias and ``D`` ``[K, 1, d]`` are ``Constant`` nodes of the
    body when ``constants`` gives them (the model's weights), else loop-carried values
    (OpenVINO's ONNX reader does not take outer-scope values in a Scan body).
    """
    from onnx import TensorProto, helper

    k, d, n, s = groups, d_inner, d_state, steps
    g = _OnnxNodes(prefix)
    shapes = {"h": [1, "batch", k, n, d]}
    if constants is None:
        shapes.update({"A": [k, n, d], "bias": [k, 1, d], "D": [k, 1, d]})
    shapes.update(
        {
            "z": [s, "batch", k, 1, d],
            "u": [s, "batch", k, 1, d],
            "B": [s, "batch", k, n, 1],
            "C": [s, "batch", k, 1, n],
        }
    )
    names = {key: f"{prefix}{key}_in" for key in shapes}
    if constants is not None:
        names.update({key: g.const(value) for key, value in constants.items()})
    delta = g.op("Add", [names["z"], names["bias"]])
    if softplus:
        delta = _softplus(g, delta)
    du = g.op("Mul", [delta, names["u"]])
    deltas, dus = g.split(delta, s, 0), g.split(du, s, 0)
    bs, cs = g.split(names["B"], s, 0), g.split(names["C"], s, 0)
    h, ys = names["h"], []
    for i in range(s):
        decay = g.op("Exp", [g.op("Mul", [deltas[i], names["A"]])])  # delta * A <= 0
        h = g.op("Add", [g.op("Mul", [decay, h]), g.op("Mul", [dus[i], bs[i]])])
        ys.append(g.op("MatMul", [cs[i], h]))  # [1, b, K, 1, d]
    y = g.op("Concat", ys, axis=0) if s > 1 else ys[0]
    y = g.op("Add", [y, g.op("Mul", [names["D"], names["u"]])])
    outputs = [(h, shapes["h"])]
    if constants is None:
        outputs += [(g.op("Identity", [names[key]]), shapes[key]) for key in ("A", "bias", "D")]
    outputs.append((y, [s, "batch", k, 1, d]))

    def info(name: str, shape: list) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inputs = [info(names[key], shapes[key]) for key in shapes if key in ("h", "z", "u", "B", "C")]
    if constants is None:
        inputs[1:1] = [info(names[key], shapes[key]) for key in ("A", "bias", "D")]
    return helper.make_graph(g.nodes, f"{prefix}body", inputs, [info(*o) for o in outputs])


def scan_onnx_nodes(
    inputs: Sequence[str],
    output: str,
    length: int,
    groups: int,
    d_state: int,
    channels: int,
    delta_softplus: bool = True,
    prefix: str = "selective_scan/",
    steps: int | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> list[Any]:
    """Standard ONNX nodes (opset 17) computing one selective scan, ending in ``output``.

    ``inputs``: the names of ``u, delta [b, K*d, L]``, ``A [K*d, N]``, ``B, C [b, K, N, L]``,
    ``D, delta_bias [K*d]`` (all float32; the batch ``b`` may be dynamic); ``output`` gets
    ``y [b, K*d, L]``. ``weights``: the values of ``A``, ``D`` and ``delta_bias`` when they are
    constants of the model (keys ``A``, ``D``, ``bias``), built into the loop body. The inputs
    go time-major once (4 Transposes), one ``Scan`` runs the recurrence ``steps`` steps per
    iteration (default: the largest divisor of ``length`` up to :data:`STEPS_PER_ITERATION`),
    and one Transpose brings ``y`` back.
    """
    from onnx import TensorProto, helper

    u, delta, A, B, C, D, bias = inputs
    k, n, length = int(groups), int(d_state), int(length)
    d = int(channels) // k
    s = steps or steps_per_iteration(length)
    if length % s:
        raise ValueError(f"steps per iteration {s} must divide the length {length}")
    g = _OnnxNodes(prefix)

    def time_major(x: str, perm: list[int], tail: list[int]) -> str:
        return g.op("Reshape", [g.op("Transpose", [x], perm=perm), g.ints([length // s, s, -1, *tail])])

    z_t, u_t = (time_major(x, [2, 0, 1], [k, 1, d]) for x in (delta, u))
    B_t = time_major(B, [3, 0, 1, 2], [k, n, 1])
    C_t = time_major(C, [3, 0, 1, 2], [k, 1, n])
    batch = g.op("Shape", [u], start=0, end=1)
    h0_shape = g.op("Concat", [g.ints([1]), batch, g.ints([k, n, d])], axis=0)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    h0 = g.op("ConstantOfShape", [h0_shape], value=zero)
    constants = None
    carried = []
    if weights is not None and {"A", "D", "bias"} <= weights.keys():
        constants = {
            "A": np.asarray(weights["A"], np.float32).reshape(k, d, n).transpose(0, 2, 1).copy(),
            "bias": np.asarray(weights["bias"], np.float32).reshape(k, 1, d),
            "D": np.asarray(weights["D"], np.float32).reshape(k, 1, d),
        }
    else:
        carried = [g.op("Transpose", [g.op("Reshape", [A, g.ints([k, d, n])])], perm=[0, 2, 1])]
        carried += [g.op("Reshape", [x, g.ints([k, 1, d])]) for x in (bias, D)]
    body = _scan_body(f"{prefix}body/", s, k, d, n, bool(delta_softplus), constants)
    scanned = g.op(
        "Scan",
        [h0, *carried, z_t, u_t, B_t, C_t],
        outputs=2 + len(carried),
        body=body,
        num_scan_inputs=4,
    )
    y = g.op("Reshape", [scanned[-1], g.ints([length, -1, k * d])])  # [L/S, S, b, K, 1, d] -> [L, b, K*d]
    g.nodes.append(helper.make_node("Transpose", [y], [output], name=g.name("Transpose"), perm=[1, 2, 0]))
    return g.nodes


def _constant_values(graph: Any) -> dict[str, np.ndarray]:
    """Values of the graph's initializers and ``Constant`` nodes, by name."""
    from onnx import helper, numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            value = helper.get_attribute_value(node.attribute[0])
            if hasattr(value, "dims"):
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def _fold_constant(name: str, values: dict[str, np.ndarray], producers: dict[str, Any]) -> np.ndarray | None:
    """The value of ``name`` when it is a constant, or a chain of Neg, Exp, Identity and float
    Casts of one (SS2D's ``A = -exp(A_log)``, which the tracing exporter leaves unfolded)."""
    from onnx import TensorProto, helper

    if name in values:
        return values[name]
    node = producers.get(name)
    if node is None or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
        return None
    if node.op_type not in ("Neg", "Exp", "Identity", "Cast"):
        return None
    value = _fold_constant(node.input[0], values, producers)
    if value is None:
        return None
    if node.op_type == "Cast":
        to = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("to")
        return value.astype(np.float32) if to == TensorProto.FLOAT else None
    if node.op_type == "Neg":
        return np.negative(value)
    return np.exp(value) if node.op_type == "Exp" else value


def _drop_dead_nodes(graph: Any) -> None:
    """Remove nodes none of whose outputs is read any more (the folded ``-exp(A_log)`` chains)."""
    while True:
        used = _used_names(graph)
        nodes = [n for n in graph.node if any(out in used for out in n.output)]
        if len(nodes) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(nodes)


def _used_names(graph: Any) -> set[str]:
    """Every name read by a node of ``graph`` or of its subgraphs, and the graph's outputs."""
    from onnx import helper

    used = {out.name for out in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            value = helper.get_attribute_value(attr)
            for sub in value if isinstance(value, list) else [value]:
                if hasattr(sub, "node"):
                    used |= _used_names(sub)
    return used


def _drop_unused_initializers(graph: Any) -> None:
    """Remove initializers and ``Constant`` nodes that nothing reads any more."""
    used = _used_names(graph)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)


def expand_onnx_placeholders(model: Any) -> int:
    """Replace every ``mambaad::SelectiveScan`` node of an ONNX ``ModelProto`` by
    :func:`scan_onnx_nodes` (in place) and drop the custom domain; returns how many were replaced."""
    from onnx import helper

    graph = model.graph
    values = _constant_values(graph)
    producers = {out: node for node in graph.node for out in node.output}
    nodes, count = [], 0
    for node in graph.node:
        if node.domain != ONNX_DOMAIN:
            nodes.append(node)
            continue
        if node.op_type != ONNX_OP:
            raise ValueError(f"unknown {ONNX_DOMAIN} operator {node.op_type!r} in the exported graph")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        named = {"A": node.input[2], "D": node.input[5], "bias": node.input[6]}
        folded = {key: _fold_constant(name, values, producers) for key, name in named.items()}
        weights = {key: value for key, value in folded.items() if value is not None}
        nodes.extend(
            scan_onnx_nodes(
                node.input,
                node.output[0],
                length=attrs["length"],
                groups=attrs["groups"],
                d_state=attrs["d_state"],
                channels=attrs["channels"],
                delta_softplus=bool(attrs.get("delta_softplus", 0)),
                prefix=f"selective_scan_{count}/",
                weights=weights,
            )
        )
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_dead_nodes(graph)
    _drop_unused_initializers(graph)
    imports = [op for op in model.opset_import if op.domain != ONNX_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return count


__all__ = [
    "CHUNK",
    "ONNX_DOMAIN",
    "ONNX_OP",
    "STEPS_PER_ITERATION",
    "blocked_scan",
    "expand_onnx_placeholders",
    "onnx_placeholders",
    "scan_onnx_nodes",
    "selective_scan_export",
    "steps_per_iteration",
]
