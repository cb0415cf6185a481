"""Differential fuzzing of the fast kernels against the mpmath oracle: forward and gradients.

    python benchmarks/fuzz_kernels.py [--draws 300] [--seed 0] [--grad] [--long] [--libraries numpy,torch,jax,generic]

(``--libraries`` also takes ``numpy.blocked`` and ``torch.blocked``, forced with ``use()``.)

Draws blocks of 1 to 7 lines of 1 to 2049 entries (``--long``: 25,000 to
131,073, so that rows go in segments and columns in several tiles), float32 or float64,
reduced along rows or columns, sometimes with a ``where`` mask, from the
families that break kernels: offsets at the edges of the kernels' ranges
(the exact shift's limits near 87 and ``-2**20``, ``1e4``, ``1e30``,
``FLT_MAX``), scales from 0 to ``1e4``, a dominant entry, ties at the max,
near-ties, rows of log-probabilities.  Each block runs through NumPy (the
compiled ``numpy.fused`` where numba is installed), torch CPU tensors
(``torch.fused``), JAX without x64 inside ``jax.jit`` (``jax.fused``, float32
only) and ``use("generic")`` (the kernels without numba on request), and every result is compared with the oracle
in ulps of the dtype (``oracle.ulp_error``).  ``--grad`` also checks the
gradients (torch autograd with the fused backward, ``jax.vjp`` under
``jax.jit``) against the float64 VJP of the exact probabilities.

Flagged (more than 4 ulps), with the input saved to ``--out``: every error
except what the contract exempts or the measurement cannot see:

* ``logsumexp`` whose max exceeds ``1.5 |lse|`` in magnitude: the sum
  cancels toward 0 (condition number ``|m| / |lse|``; the contract's
  cancels-to-near-zero case);
* on ``jax.fused``, values below ``n 2**-100`` in magnitude: XLA flushes
  subnormal terms (docs/jax.md, "Subnormal terms");
* gradients: units of an ulp plus ``eps`` times the VJP's condition
  (``|y| (|g| + sum |y g|)`` for softmax, ``|g| + p sum |g|`` for
  log_softmax), and differences within ``4 tiny`` (flushing near the
  smallest normal number); a 16-unit threshold.

On 2026-11-30 it found JAX float32 softmax of ``[86.901474, 86.899925]``
giving ``[0, 0]`` (and the gradient of its logsumexp), and the oracle's own
``log_softmax`` rounding a ``-1.25e-47`` at a column's max to 0; both fixed.
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

import lse_dispatch
from lse_dispatch import oracle

OPS = ("logsumexp", "softmax", "log_softmax")
OFFSETS = (0.0, 0.0, 0.0, 87.0, 88.0, -87.0, 86.9, 85.5, 80.0, -(2.0**20), -(2.0**20) + 3, 1e4, -1e4, 1e30, -1e30,
           0.5, -0.5, 1e-3, 3.4e38, -3.4e38, 1e-40)


#: ``--long``: rows longer than a segment (``SEGMENT = 2**16`` entries) and columns
#: taller than a tile (256 KiB of a block of columns), in pieces and merged.
LONG_LENGTHS = (25000, 65537, 70000, 131073)


def _draw(rng, long=False):
    """``(x, axis, where)``: one block of lines (``long``: of ``LONG_LENGTHS`` entries)."""
    n = int(rng.choice(LONG_LENGTHS if long else [1, 2, 3, 5, 8, 16, 17, 31, 128, 129, 1000, 2049]))
    rows = int(rng.choice([1, 2, 3, 7]))
    dtype = rng.choice([np.float32, np.float64])
    scale = float(rng.choice([0, 1e-6, 1e-3, 0.1, 1, 5, 30, 100, 1e4]))
    x = rng.standard_normal((rows, n)) * scale + float(rng.choice(OFFSETS))
    kind = int(rng.integers(0, 6))
    if kind == 1:  # a dominant entry
        x[:, rng.integers(0, n)] += float(rng.choice([10, 20, 30, 60, 90]))
    elif kind == 2:  # ties at the max
        x[:, : max(1, n // 3)] = x.max()
    elif kind == 3:  # near-ties
        x = np.round(x, int(rng.integers(0, 4)))
    elif kind == 4:  # log-probabilities
        top = x.max(-1, keepdims=True)
        x = x - top - np.log(np.sum(np.exp(x - top), -1, keepdims=True))
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(dtype)
    x = np.where(np.isfinite(x), x, np.finfo(dtype).max * np.sign(x)).astype(dtype)
    axis = -1
    if rng.random() < (0.5 if long else 0.3):
        x, axis = np.ascontiguousarray(x.T), 0
    where = rng.random(x.shape) < 0.7 if rng.random() < 0.2 else None
    return x, axis, where


def _libraries(names):
    """``name -> run(op, x, axis, where)`` (``None`` where the library does not take the dtype)."""
    runs = {}
    for name in names:
        if name == "numpy":
            runs[name] = lambda op, x, axis, where: np.asarray(getattr(lse_dispatch, op)(x, axis=axis, where=where))
        elif name == "generic":
            def generic(op, x, axis, where):
                with lse_dispatch.use("generic"):
                    return np.asarray(getattr(lse_dispatch, op)(x, axis=axis, where=where))
            runs[name] = generic
        elif name in ("numpy.blocked", "torch.blocked"):
            def forced(op, x, axis, where, kernel=name):
                if kernel.startswith("torch"):
                    import torch

                    x, where = torch.from_numpy(x), None if where is None else torch.from_numpy(where)
                with lse_dispatch.use(kernel):
                    out = getattr(lse_dispatch, op)(x, axis=axis, where=where)
                return out.numpy() if kernel.startswith("torch") else np.asarray(out)
            runs[name] = forced
        elif name == "torch":
            import torch

            def on_torch(op, x, axis, where):
                mask = None if where is None else torch.from_numpy(where)
                return getattr(lse_dispatch, op)(torch.from_numpy(x), axis=axis, where=mask).numpy()
            runs[name] = on_torch
        elif name == "jax":
            import jax
            import jax.numpy as jnp

            def on_jax(op, x, axis, where):
                if x.dtype != np.float32 or jax.config.jax_enable_x64:
                    return None
                mask = None if where is None else jnp.asarray(where)
                return np.asarray(jax.jit(lambda v: getattr(lse_dispatch, op)(v, axis=axis, where=mask))(jnp.asarray(x)))
            runs[name] = on_jax
    return runs


def _forward_errors(name, op, x, axis, where, got, exact):
    errors = oracle.ulp_error(got, exact, x.dtype)
    values = np.asarray(exact, dtype=np.float64)
    if name == "jax":
        errors = np.where(np.abs(values) < x.shape[axis] * 2.0**-100, 0.0, errors)
    if op == "logsumexp":
        top = np.max(x if where is None else np.where(where, x, -np.inf), axis=axis).astype(np.float64)
        errors = np.where((np.abs(top) <= 1.5 * np.abs(values)) | ~np.isfinite(errors), errors, 0.0)
    return errors


def _gradients(names, op, x, rng):
    """``(name, errors)`` of each library's gradient of ``op`` along the last axis."""
    dtype = x.dtype
    g = rng.standard_normal(x.shape).astype(dtype)
    row_g = rng.standard_normal(x.shape[:1]).astype(dtype)
    p = np.asarray(oracle.exact_softmax(x, axis=-1), np.float64)
    g64, r64 = g.astype(np.float64), row_g.astype(np.float64)[:, None]
    if op == "softmax":
        want = p * (g64 - np.sum(p * g64, -1, keepdims=True))
        size = p * (np.abs(g64) + np.sum(p * np.abs(g64), -1, keepdims=True))
    elif op == "log_softmax":
        want = g64 - p * np.sum(g64, -1, keepdims=True)
        size = np.abs(g64) + p * np.sum(np.abs(g64), -1, keepdims=True)
    else:
        want, size = p * r64, p * np.abs(r64)
    cotangent = row_g if op == "logsumexp" else g
    got = {}
    if "torch" in names:
        import torch

        tx = torch.from_numpy(x.copy()).requires_grad_(True)
        getattr(lse_dispatch, op)(tx, axis=-1).backward(torch.from_numpy(cotangent))
        got["torch"] = tx.grad.numpy()
    if "jax" in names and dtype == np.float32:
        import jax
        import jax.numpy as jnp

        vjp = jax.jit(lambda v, c: jax.vjp(lambda u: getattr(lse_dispatch, op)(u, axis=-1), v)[1](c)[0])
        got["jax"] = np.asarray(vjp(jnp.asarray(x), jnp.asarray(cotangent)))
    tiny, eps = float(np.finfo(dtype).tiny), float(np.finfo(dtype).eps)
    unit = np.where(np.abs(want) < tiny, tiny, np.spacing(np.abs(want).astype(dtype)).astype(np.float64))
    for name, value in got.items():
        difference = np.abs(value.astype(np.float64) - want)
        errors = np.where(difference <= 4 * tiny, 0.0, difference / (unit + eps * size))
        yield name, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad", action="store_true", help="also the gradients (torch, JAX)")
    parser.add_argument("--libraries", default="numpy,torch,jax,generic")
    parser.add_argument("--out", default="fuzz_kernels_failures", help="folder for the flagged inputs")
    parser.add_argument("--long", action="store_true", help="lines in pieces: long rows and tall columns")
    args = parser.parse_args(argv)
    try:
        from lse_dispatch.backends import _fused_cpu

        _fused_cpu.warm_up()
    except ImportError:
        pass
    names = [name.strip() for name in args.libraries.split(",") if name.strip()]
    runs = _libraries(names)
    rng = np.random.default_rng(args.seed)
    worst: dict = {}
    flagged = 0

    def record(key, errors, block, note):
        nonlocal flagged
        value = float(np.max(errors)) if errors.size else 0.0
        worst[key] = max(worst.get(key, 0.0), value)
        if value > (16.0 if key[-1] == "grad" else 4.0):
            flagged += 1
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"seed{args.seed}_{flagged}.npz")
            np.savez(path, **block)
            print(f"flagged: {' '.join(key)} {value:.3g} {note} -> {path}", flush=True)

    for _ in range(args.draws):
        x, axis, where = _draw(rng, args.long)
        block = {"x": x, "axis": axis} if where is None else {"x": x, "axis": axis, "where": where}
        exact = {op: getattr(oracle, f"exact_{op}")(x, axis=axis, where=where) for op in OPS}
        for op in OPS:
            for name, run in runs.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = run(op, x, axis, where)
                if got is not None:
                    errors = _forward_errors(name, op, x, axis, where, got, exact[op])
                    record((name, op, str(x.dtype), "forward"), errors, block, f"shape {x.shape} axis {axis}")
            if args.grad and axis == -1 and where is None:
                for name, errors in _gradients(names, op, x, rng):
                    record((name, op, str(x.dtype), "grad"), errors, block, f"shape {x.shape}")
    lines = " of long lines" if args.long else ""
    print(f"seed {args.seed}, {args.draws} draws{lines}: worst errors (ulps; gradients in the units above)")
    for key in sorted(worst):
        print(f"  {' '.join(key):40s} {worst[key]:10.3g}")
    print(f"{flagged} flagged")
    return 1 if flagged else 0


if __name__ == "__main__":
    raise SystemExit(main())
