"""Compile the Triton kernels for sm_90 without a GPU; print one JSON line per kernel.

Run by tests/test_triton_kernels.py in a subprocess without TRITON_INTERPRET
(the interpreter replaces the kernels' compilation).  For each kernel in the
configurations the host code launches, it records whether the PTX holds an
approximate ``ex2``/``lg2``/division (Triton's float32 ``exp``/``log``/``/``
become those; the kernels must use float64 ones) and, through the ptxas that
ships with triton, the spills at the kernel's warp count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

# Nothing is imported or changed at import time: pytest's --doctest-modules
# imports this file while collecting, inside processes that run the
# interpreter.
# float32 approximations (Triton's float32 exp, log and division).  Not
# rcp.approx.ftz.f64: libdevice's float64 log seeds a reciprocal with it and
# refines it (documented within 1 ulp); float64 division is div.rn.f64.
APPROXIMATE = re.compile(r"\b(ex2\.approx|lg2\.approx|div\.full|div\.approx|rcp\.approx|rsqrt\.approx)(\.ftz)?\.f32\b")


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _spills(ptx: str) -> int | None:
    ptxas = _ptxas()
    if not os.path.exists(ptxas):
        return None
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        log = subprocess.run([ptxas, f"-arch={arch}", "-v", handle.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def _compile(name, fn, signature, constexprs, warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    print(json.dumps({"kernel": name, "constexprs": {key: str(v) for key, v in constexprs.items()}, "warps": warps,
                      "approximate": sorted({m.group(0) for m in APPROXIMATE.finditer(ptx)}), "spill_bytes": _spills(ptx)}),
          flush=True)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET: the interpreter replaces compilation")
    from lse_dispatch.backends import _triton_kernels as k

    for x_type, wide in (("*fp32", True), ("*fp64", False), ("*bf16", True)):
        n_cols = k.ONE_PASS_MAX if wide else k.ONE_PASS_MAX // 2
        _, rows, block, warps, _ = k.config(1, n_cols, wide)
        for op in (0, 1, 2):
            sig = {"x_ptr": x_type, "w_ptr": "*u8", "out_ptr": x_type, "value_ptr": x_type, "m_ptr": "*fp64",
                   "count_ptr": "*fp64", "rest_ptr": "*fp64", "special_ptr": "*fp64", "n_rows": "i32", "n_cols": "i32",
                   "OP": "constexpr", "HAS_WHERE": "constexpr", "WIDE": "constexpr", "ROWS": "constexpr",
                   "BLOCK": "constexpr"}
            _compile("one_pass", k._one_pass_kernel, sig,
                     {"OP": op, "HAS_WHERE": True, "WIDE": wide, "ROWS": rows, "BLOCK": block}, warps)
        for log in (False, True):
            sig = {"y_ptr": x_type, "g_ptr": x_type, "w_ptr": "*u8", "out_ptr": x_type, "n_rows": "i32",
                   "n_cols": "i32", "LOG": "constexpr", "HAS_WHERE": "constexpr", "WIDE": "constexpr",
                   "ROWS": "constexpr", "BLOCK": "constexpr"}
            _compile("vjp_one_pass", k._vjp_one_pass_kernel, sig,
                     {"LOG": log, "HAS_WHERE": True, "WIDE": wide, "ROWS": rows, "BLOCK": block}, warps)
        _, _, _, part_warps, elementwise_warps, _ = k.config(1, 4 * k.ONE_PASS_MAX, wide)
        sig = {"x_ptr": x_type, "w_ptr": "*u8", "pm_ptr": "*fp64", "pc_ptr": "*fp64", "pr_ptr": "*fp64",
               "n_cols": "i32", "n_parts": "i32", "HAS_WHERE": "constexpr", "WIDE": "constexpr", "BLOCK": "constexpr",
               "TILES": "constexpr"}
        _compile("part_state", k._part_state_kernel, sig,
                 {"HAS_WHERE": True, "WIDE": wide, "BLOCK": k.PART_BLOCK, "TILES": k.PART_TILES}, part_warps)
        sig = {"pm_ptr": "*fp64", "pc_ptr": "*fp64", "pr_ptr": "*fp64", "n_parts": "i32", "value_ptr": x_type,
               "m_ptr": "*fp64", "count_ptr": "*fp64", "rest_ptr": "*fp64", "special_ptr": "*fp64", "n_rows": "i32",
               "OP": "constexpr", "WIDE": "constexpr", "BLOCK": "constexpr"}
        _compile("merge_rows", k._merge_rows_kernel, sig, {"OP": 0, "WIDE": wide, "BLOCK": k.MERGE_BLOCK},
                 k._warps(k.MERGE_BLOCK))
        sig = {"x_ptr": x_type, "w_ptr": "*u8", "out_ptr": x_type, "m_ptr": "*fp64", "count_ptr": "*fp64",
               "rest_ptr": "*fp64", "n_cols": "i32", "n_blocks": "i32", "OP": "constexpr", "HAS_WHERE": "constexpr",
               "WIDE": "constexpr", "BLOCK": "constexpr"}
        for op in (1, 2):
            _compile("normalize", k._normalize_kernel, sig,
                     {"OP": op, "HAS_WHERE": True, "WIDE": wide, "BLOCK": k.ELEMENTWISE_BLOCK}, elementwise_warps)
        sig = {"x_ptr": x_type, "w_ptr": "*u8", "m_ptr": "*fp64", "count_ptr": "*fp64", "rest_ptr": "*fp64",
               "g_ptr": x_type, "out_ptr": x_type, "n_cols": "i32", "n_blocks": "i32", "HAS_WHERE": "constexpr",
               "WIDE": "constexpr", "BLOCK": "constexpr"}
        _compile("lse_backward", k._lse_backward_kernel, sig,
                 {"HAS_WHERE": True, "WIDE": wide, "BLOCK": k.ELEMENTWISE_BLOCK}, k._warps(k.ELEMENTWISE_BLOCK))
    return 0


if __name__ == "__main__":
    sys.exit(main())
