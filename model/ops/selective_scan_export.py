# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""Selective scan in a few plain tensor ops, for ONNX / OpenVINO / TorchScript export (backend ``export``).

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t``, ``y_t = C_t . h_t + D * u_t`` is
computed with Split, Mul, Exp, Add, MatMul, CumSum, Concat and Reshape only, so the exported
graph needs no custom operator and no loop operator, and stays small (a few hundred nodes
per scan, independent of the sequence length up to a log factor):

1. the sequence is cut into chunks of ``T`` steps (``CHUNK``; zero-padded at the end);
2. all chunks at once, the recurrence runs from a zero state over the ``T`` steps of its
   chunk (``T`` unrolled steps, each on a tensor holding one step of every chunk), decays
   and inputs formed on the fly and each state reduced over N at once, so no ``[L, ..., N]``
   tensor is ever materialised (peak memory about ``1/T`` of the full state sequence);
3. the chunk-end states are carried across chunks by :func:`blocked_scan` (the same idea on
   the ``L / T`` chunk ends, recursively, with log decay ``A * sum(delta over the chunk)``);
4. each output gets the carried state's share ``C_t . (exp(A * cumsum(delta)_t) * carry)``.

Every exponent taken is a log decay ``delta * A`` summed over steps, <= 0 since ``A < 0`` and
``delta > 0`` (after softplus): nothing can overflow, unlike formulations with
``exp(-cumsum)``. The backend is differentiable (plain autograd) but meant for inference;
training uses ``cpu``, ``triton`` or ``mamba_ssm``.
"""

from __future__ import annotations

import torch

from model.ops.selective_scan import _finish, _prepare

CHUNK = 16


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
    """Selective scan ``[b, K*d, L] -> [b, K*d, L]`` (fp32) by :func:`_chunked_outputs`; same contract
    as :func:`model.ops.selective_scan.selective_scan_fn`."""
    u_t, delta_t, A, B_t, C_t = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    y_t = _chunked_outputs(delta_t, delta_t * u_t, A, B_t, C_t, chunk)
    return _finish(y_t, u_t, D)


__all__ = ["CHUNK", "blocked_scan", "selective_scan_export"]
