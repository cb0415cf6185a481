"""Derivatives follow the limit semantics, on torch and JAX (issue 3).

Every rule is checked against analytic values (or the mpmath oracle) on both
backends through one adapter, then the transforms are smoke-tested with the
values they return.  Float64 throughout (JAX under ``jax.enable_x64``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lse_dispatch import log_softmax, logsumexp, softmax
from lse_dispatch.oracle import exact_softmax

from ._helpers import Adapter

pytestmark = [
    # torch's own forward-AD setup and inductor still call torch.jit.script(_method).
    pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:DeprecationWarning"),
    # torch.compile tracing array-api-compat's cached namespace lookup, and
    # instantiating autograd.Function classes internally while it traces them.
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
    pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated"),
]

inf = math.inf
BACKENDS = ["torch", "jax"]


@pytest.fixture(params=BACKENDS)
def ad(request):
    adapter = Adapter(request.param)
    if request.param == "jax":
        with adapter.jax.enable_x64(True):
            yield adapter
    else:
        yield adapter


def close(got, expected, rtol=4e-16, atol=0.0):
    np.testing.assert_allclose(got, np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


def exact(x, where=None):
    return np.asarray(exact_softmax(np.asarray(x), where=None if where is None else np.asarray(where)), dtype=float)


# --- logsumexp: d lse / da = softmax, with its limits -----------------------------


@pytest.mark.parametrize(
    "x",
    [[1.0, 2.0, 3.0], [1e4, 1e4 - 1.0], [0.0, -40.0, -700.0], [-3.0, -3.0, -3.0]],
    ids=["small", "large-shifted", "tiny-rest", "ties"],
)
def test_lse_gradient_is_softmax(ad, x):
    (g,) = ad.grad(lambda a: logsumexp(a), ad.array(x))
    close(g, exact(x), rtol=2e-15)


@pytest.mark.parametrize(
    "x, expected",
    [
        ([-inf, -inf], [0.0, 0.0]),
        ([inf, 0.0], [1.0, 0.0]),
        ([inf, inf, 0.0], [0.5, 0.5, 0.0]),
        ([inf, inf, inf, -inf], [1 / 3, 1 / 3, 1 / 3, 0.0]),
        ([0.0, -inf], [1.0, 0.0]),
        ([-inf, 2.0, -inf], [0.0, 1.0, 0.0]),
    ],
    ids=["all-neg-inf", "one-pos-inf", "two-pos-inf", "three-pos-inf", "neg-inf-entry", "one-finite"],
)
def test_lse_gradient_at_infinities(ad, x, expected):
    (g,) = ad.grad(lambda a: logsumexp(a), ad.array(x))
    close(g, expected)


def test_lse_gradient_masked_entries_exactly_zero(ad):
    # The masked entries hold NaN and a huge value; neighbours get softmax of the rest.
    x = [0.0, math.nan, 1.0, 1e300]
    mask = [True, False, True, False]
    (g,) = ad.grad(lambda a: logsumexp(a, where=ad.mask(mask)), ad.array(x))
    close(g, [*exact([0.0, 1.0])[:1], 0.0, *exact([0.0, 1.0])[1:], 0.0], rtol=2e-15)
    assert g[1] == 0.0 and g[3] == 0.0


def test_lse_gradient_all_masked_is_zero(ad):
    mask = ad.mask([[False, False], [True, False]])
    (g,) = ad.grad(lambda a: logsumexp(a, axis=1, where=mask).sum(), ad.array([[1.0, 2.0], [3.0, -inf]]))
    close(g, [[0.0, 0.0], [1.0, 0.0]])


def test_lse_gradient_large_masked_logits_float32(ad):
    # jax#17117: masked logits near the float32 max must not make NaN.
    x = ad.array([0.0, 3e38, -1.0], dtype="float32")
    (g,) = ad.grad(lambda a: logsumexp(a, where=ad.mask([True, False, True])), x)
    assert g.dtype == np.float32
    close(g, [1 / (1 + math.exp(-1)), 0.0, 1 / (1 + math.exp(1))], rtol=1e-6)


def test_lse_gradients_with_weights_including_zero(ad):
    a, b = [0.3, -1.0, 2.0, 0.5], [1.0, 0.0, 2.0, 0.5]
    ga, gb = ad.grad(lambda x, y: logsumexp(x, b=y), ad.array(a), ad.array(b), argnums=(0, 1))
    total = sum(bi * math.exp(ai) for ai, bi in zip(a, b))
    close(ga, [bi * math.exp(ai) / total for ai, bi in zip(a, b)], rtol=1e-15)
    # d lse / d b_i = exp(a_i) / sum, also (and especially) where b_i == 0 (jax#22398).
    close(gb, [math.exp(ai) / total for ai in a], rtol=1e-15)
    assert ga[1] == 0.0 and gb[1] > 0


def test_lse_gradients_all_weights_zero(ad):
    # lse = -inf is constant in a; in b it is not differentiable, 0 is returned.
    ga, gb = ad.grad(lambda x, y: logsumexp(x, b=y), ad.array([1.0, 2.0]), ad.array([0.0, 0.0]), argnums=(0, 1))
    close(ga, [0.0, 0.0])
    close(gb, [0.0, 0.0])


def test_lse_gradients_negative_sum_with_return_sign(ad):
    # S = e^0 - 2 e^0 = -1: lse = log|S| = 0, sign -1.
    def value(x, y):
        out, _ = logsumexp(x, b=y, return_sign=True)
        return out

    ga, gb = ad.grad(value, ad.array([0.0, 0.0]), ad.array([1.0, -2.0]), argnums=(0, 1))
    close(ga, [-1.0, 2.0])
    close(gb, [-1.0, -1.0])


def test_lse_gradient_broadcast_weights_and_axis(ad):
    a = np.array([[0.0, 1.0, 2.0], [3.0, -inf, 1.0]])
    b = np.array([1.0, 0.5, 2.0])
    ga, gb = ad.grad(lambda x, y: logsumexp(x, axis=1, b=y).sum(), ad.array(a.tolist()), ad.array(b.tolist()),
                     argnums=(0, 1))
    terms = b * np.exp(a)
    totals = terms.sum(axis=1, keepdims=True)
    close(ga, terms / totals, rtol=1e-15)
    close(gb, (np.exp(a) / totals).sum(axis=0), rtol=1e-15)


# --- softmax and log_softmax --------------------------------------------------------


def test_softmax_backward_with_masked_and_neg_inf(ad):
    x = [0.5, -inf, 2.0, 7.0, -1.0]
    mask = [True, True, True, False, True]
    c = [1.0, 2.0, -3.0, 4.0, 0.5]
    (g,) = ad.grad(lambda a: (softmax(a, where=ad.mask(mask)) * ad.array(c)).sum(), ad.array(x))
    y = exact(x, mask)
    expected = y * (np.array(c) - (np.array(c) * y).sum())
    close(g, expected, rtol=1e-14, atol=1e-16)
    assert g[1] == 0.0 and g[3] == 0.0


def test_softmax_backward_survives_nan_cotangent_on_masked_entry(ad):
    # log(softmax) is -inf on the masked entry; the where gives log a zero
    # cotangent, whose backward (0 / 0) hands softmax a NaN there.
    mask = ad.mask([True, False, True])

    def loss(a):
        return ad.where(mask, _log(ad, softmax(a, where=mask)), 0.0).sum()

    (g,) = ad.grad(loss, ad.array([0.0, 5.0, 1.0]))
    # d/dx_j of the sum of x_i - lse over the 2 included entries: 1 - 2 p_j.
    p = exact([0.0, 1.0])
    close(g, [1 - 2 * p[0], 0.0, 1 - 2 * p[1]], rtol=1e-14, atol=1e-16)


def _log(ad, x):
    return ad.torch.log(x) if ad.name == "torch" else ad.jnp.log(x)


def test_log_softmax_backward_with_masked_and_neg_inf(ad):
    x = [0.5, -inf, 2.0, math.nan, -1.0]
    mask = [True, True, True, False, True]
    c = [1.0, 0.0, -3.0, 4.0, 0.5]
    # The loss ignores the -inf output of the masked entry and the -inf entry.
    keep = ad.mask([True, False, True, False, True])

    def loss(a):
        return ad.where(keep, log_softmax(a, where=ad.mask(mask)) * ad.array(c), 0.0).sum()

    (g,) = ad.grad(loss, ad.array(x))
    p = exact([0.5, -inf, 2.0, 0.0, -1.0], mask)
    cm = np.array([1.0, 0.0, -3.0, 0.0, 0.5])
    expected = cm - p * cm.sum()
    expected[3] = 0.0
    close(g, expected, rtol=1e-14, atol=1e-16)
    assert g[3] == 0.0


def test_log_softmax_backward_at_pos_inf(ad):
    keep = ad.mask([True, True, False])
    (g,) = ad.grad(lambda a: ad.where(keep, log_softmax(a), 0.0).sum(), ad.array([inf, inf, 0.0]))
    # z_i = x_i - lse; sum over the two +inf entries: g - p * 2 with p = (1/2, 1/2, 0).
    close(g, [0.0, 0.0, 0.0])


# --- second derivatives -------------------------------------------------------------


def _hessian_expected(x):
    p = exact(x)
    return np.diag(p) - np.outer(p, p)


def test_hessian_of_lse_torch():
    torch = pytest.importorskip("torch")
    x = [0.3, -1.0, 2.0, -inf, inf, inf]
    H = torch.func.hessian(lambda a: logsumexp(a))(torch.tensor(x, dtype=torch.float64))
    p = np.array([0, 0, 0, 0, 0.5, 0.5])
    close(H.numpy(), np.diag(p) - np.outer(p, p))
    x = [0.3, -1.0, 2.0, 0.5]
    H = torch.func.jacrev(torch.func.jacrev(lambda a: logsumexp(a)))(torch.tensor(x, dtype=torch.float64))
    close(H.numpy(), _hessian_expected(x), rtol=1e-14, atol=1e-16)


def test_hessian_of_lse_jax():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        x = [0.3, -1.0, 2.0, 0.5, -inf]
        H = jax.jit(jax.hessian(lambda a: logsumexp(a)))(jax.numpy.asarray(x))
        close(np.asarray(H), _hessian_expected(x), rtol=1e-14, atol=1e-16)
        H = jax.jit(jax.jacrev(jax.jacfwd(lambda a: logsumexp(a))))(jax.numpy.asarray([inf, inf, 0.0]))
        p = np.array([0.5, 0.5, 0.0])
        close(np.asarray(H), np.diag(p) - np.outer(p, p))


# --- torch: gradcheck, gradgradcheck, forward AD, torch.func ------------------------


TORCH_FUNCTIONS = {
    "lse": lambda x, b: logsumexp(x, axis=1),
    "lse-where": lambda x, b: logsumexp(x, axis=1, where=_MASK),
    "lse-b": lambda x, b: logsumexp(x, axis=1, b=b),
    "lse-b-sign": lambda x, b: logsumexp(x, axis=0, b=b - 0.6, return_sign=True)[0],
    "softmax-where": lambda x, b: softmax(x, axis=1, where=_MASK),
    "log_softmax-where": lambda x, b: log_softmax(x, axis=1, where=_MASK).masked_fill(~_MASK, 0.0),
}
_MASK = None


@pytest.mark.parametrize("name", list(TORCH_FUNCTIONS))
def test_torch_gradcheck_gradgradcheck(name):
    torch = pytest.importorskip("torch")
    global _MASK
    _MASK = torch.tensor([[True, False, True, True]] * 3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.rand(3, 4, dtype=torch.float64, generator=gen)
    b[0, 1] = 0.0
    b.requires_grad_(True)
    fn = TORCH_FUNCTIONS[name]
    assert torch.autograd.gradcheck(fn, (x, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_torch_func_transforms():
    torch = pytest.importorskip("torch")
    from torch.func import grad, jacfwd, jacrev, vmap

    rows = torch.tensor([[0.0, 1.0, 2.0], [inf, inf, 0.0], [-inf, -inf, -inf]], dtype=torch.float64)
    g = vmap(grad(lambda a: logsumexp(a)))(rows)
    close(g.numpy(), [exact([0.0, 1.0, 2.0]), [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], rtol=2e-15)
    x = torch.tensor([0.5, -inf, 2.0], dtype=torch.float64)
    y = exact([0.5, -inf, 2.0])
    expected = np.diag(y) - np.outer(y, y)
    close(jacrev(lambda a: softmax(a))(x).numpy(), expected, rtol=1e-14, atol=1e-16)
    close(jacfwd(lambda a: softmax(a))(x).numpy(), expected, rtol=1e-14, atol=1e-16)
    close(vmap(lambda a: logsumexp(a, axis=0))(rows[:1]).numpy(), [math.log(1 + math.e + math.e**2)], rtol=1e-15)


def test_torch_compile_fullgraph_forward_and_backward():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch._inductor")

    def loss(a, mask, c):
        return logsumexp(a, axis=1, where=mask).sum() + (softmax(a[0], where=mask[0]) * c).sum()

    compiled = torch.compile(loss, fullgraph=True)
    a = torch.tensor([[1.0, 2.0, -inf], [inf, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = compiled(a, mask, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    out.backward()
    assert out.item() == inf
    p = exact([1.0, 2.0])
    c = np.array([1.0, 2.0])
    softmax_grad = p * (c - (c * p).sum())
    close(a.grad.numpy(), [[p[0] + softmax_grad[0], p[1] + softmax_grad[1], 0.0], [1.0, 0.0, 0.0]], rtol=1e-14)


# --- JAX: check_grads and transforms ------------------------------------------------


JAX_FUNCTIONS = {
    "lse": lambda jnp: (lambda x, b: logsumexp(jnp.asarray(x), axis=1)),
    "lse-where": lambda jnp: (lambda x, b: logsumexp(jnp.asarray(x), axis=1, where=_jmask(jnp))),
    "lse-b": lambda jnp: (lambda x, b: logsumexp(jnp.asarray(x), axis=1, b=jnp.asarray(b))),
    "lse-b-sign": lambda jnp: (
        lambda x, b: logsumexp(jnp.asarray(x), axis=0, b=jnp.asarray(b) - 0.6, return_sign=True)[0]
    ),
    "softmax-where": lambda jnp: (lambda x, b: softmax(jnp.asarray(x), axis=1, where=_jmask(jnp))),
    "log_softmax-where": lambda jnp: (
        lambda x, b: jnp.where(_jmask(jnp), log_softmax(jnp.asarray(x), axis=1, where=_jmask(jnp)), 0.0)
    ),
}


def _jmask(jnp):
    return jnp.asarray([[True, False, True, True]] * 3)


# lse and lse-b are special cases of lse-b-sign; each check costs several compilations.
@pytest.mark.parametrize("name", ["lse-where", "lse-b-sign", "softmax-where", "log_softmax-where"])
def test_jax_check_grads_second_order(name):
    jax = pytest.importorskip("jax")
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jax.numpy.asarray(rng.standard_normal((3, 4)))
        b = rng.random((3, 4))
        b[0, 1] = 0.0
        b = jax.numpy.asarray(b)
        check_grads(jax.jit(JAX_FUNCTIONS[name](jax.numpy)), (x, b), order=2, modes=("fwd", "rev"))


def test_jax_transforms():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        rows = jnp.asarray([[0.0, 1.0, 2.0], [inf, inf, 0.0], [-inf, -inf, -inf]])
        g = jax.jit(jax.vmap(jax.grad(lambda a: logsumexp(a))))(rows)
        close(np.asarray(g), [exact([0.0, 1.0, 2.0]), [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], rtol=2e-15)
        x = jnp.asarray([0.5, -inf, 2.0])
        y = exact([0.5, -inf, 2.0])
        expected = np.diag(y) - np.outer(y, y)
        close(np.asarray(jax.jit(jax.jacrev(lambda a: softmax(a)))(x)), expected, rtol=1e-14, atol=1e-16)
        close(np.asarray(jax.jit(jax.jacfwd(lambda a: softmax(a)))(x)), expected, rtol=1e-14, atol=1e-16)
        close(np.asarray(jax.jit(lambda a: logsumexp(a, axis=1))(rows[:1])), [math.log(1 + math.e + math.e**2)],
              rtol=1e-15)


# --- dispatch: the derivative kernels take only differentiated calls ----------------


def test_torch_kernel_declines_plain_forward():
    torch = pytest.importorskip("torch")
    from lse_dispatch._call import prepare
    from lse_dispatch.backends import _torch_grad

    kernel = _torch_grad.KERNELS[0]
    x = torch.ones(3)
    assert kernel.declines(prepare("logsumexp", x, axis=None)) == "no derivative is being taken"
    assert kernel.declines(prepare("logsumexp", x.requires_grad_(True), axis=None)) is None
    with torch.no_grad():
        assert kernel.declines(prepare("logsumexp", x, axis=None)) is not None
    assert logsumexp(torch.ones(3)).grad_fn is None


def test_jax_kernel_takes_only_traced_calls():
    jax = pytest.importorskip("jax")
    from lse_dispatch._call import prepare
    from lse_dispatch.backends import _jax_grad

    kernel = _jax_grad.KERNELS[0]
    x = jax.numpy.ones(3)
    assert kernel.declines(prepare("logsumexp", x, axis=None)) is not None
    seen = []
    jax.jit(lambda a: seen.append(kernel.declines(prepare("logsumexp", a, axis=None))) or a)(x)
    assert seen == [None]


def test_jax_rules_compile_to_the_same_program_under_jit():
    # No forward cost: with the custom_jvp rules (the autodiff kernel) or with
    # the generic code traced directly, jit compiles the same XLA program
    # (only source-location metadata differs).  Both sides run the same
    # generic math, optimization barriers included, so like is compared with
    # like; the trace shows which implementation each side took.
    import re

    import lse_dispatch

    jax = pytest.importorskip("jax")

    x = jax.numpy.linspace(-3.0, 3.0, 64)
    # A where (all True) keeps jax.fused out: it takes plain float32 calls with
    # rules of its own (tests/test_jax_traced.py), and both sides here are
    # to run the shared generic math.
    mask = jax.numpy.ones(64, dtype=bool)

    def programs(choice):
        """(StableHLO as lowered, optimized HLO without its debug tables)."""
        with lse_dispatch.use(choice), lse_dispatch.trace() as seen:
            lowered = jax.jit(lambda a, m: logsumexp(a, where=m)).lower(x, mask)
        assert seen.implementations == [choice], str(seen)
        compiled = re.sub(r", metadata=\{[^}]*\}", "", lowered.compile().as_text())
        # The tables of Python source files, functions and stack frames name
        # the frames the rules add; they are debug information, not program.
        lines, in_table = [], False
        for line in compiled.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                in_table = True
            elif in_table and not line.strip():
                in_table = False
            elif not in_table:
                lines.append(line)
        return lowered.as_text(), lines

    with_rules = programs("autodiff")
    without_rules = programs("generic")
    # No optimization barrier in either program: the float32 sums and TwoSum
    # are written so that XLA can fuse them (tests/test_jax_fused.py).
    assert "optimization_barrier" not in with_rules[0]
    assert with_rules[0] == without_rules[0]
    assert any(line.startswith("ENTRY") for line in with_rules[1])
    assert with_rules[1] == without_rules[1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_reduced_precision_gradients_keep_dtype(ad, dtype):
    # Computed in float32 (float64 accumulation), returned in the input dtype.
    x = ad.array([1.0, 2.0, inf, inf], dtype=dtype)
    (g,) = ad.grad(lambda a: logsumexp(a).astype("float32") if ad.name == "jax" else logsumexp(a).float(), x)
    assert ad.dtypes == [dtype]
    close(np.asarray(g, dtype=np.float64), [0.0, 0.0, 0.5, 0.5])
    x = ad.array([1.0, 2.0, 3.0], dtype=dtype)
    (g,) = ad.grad(lambda a: (softmax(a) * ad.array([0.0, 1.0, 2.0], dtype=dtype)).sum(), x)
    y = exact([1.0, 2.0, 3.0])
    close(np.asarray(g, dtype=np.float64), y * (np.arange(3) - (np.arange(3) * y).sum()), rtol=1e-2)


def test_torch_gradient_for_float_weights_of_integer_exponents():
    torch = pytest.importorskip("torch")
    b = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    logsumexp(torch.tensor([0, 1, 2]), b=b).backward()
    e = np.exp([0.0, 1.0, 2.0])
    close(b.grad.numpy(), e / (1 + 2 * e[2]), rtol=1e-15)
