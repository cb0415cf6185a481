"""The forward filter of a hidden Markov model in log space, on ``logmatmulexp``.

The filtering recursion of the seeds,

    log alpha_t = log p(v_t | h_t) + LSE_h(log alpha_{t-1} + log p(h_t | h_{t-1})),

is a log-space vector-matrix product: ``logmatmulexp(log_alpha, log_A)``.
This script runs it on NumPy, torch and JAX (``lax.scan`` under ``jit``),
and checks the log-likelihood ``log p(v_1..T) = logsumexp(log alpha_T)``
against two independent computations:

* the *scaled* forward algorithm in float64 (probabilities renormalised at
  every step, the log of the scales summed), which never forms a log-sum-exp;
* on a small model and a short sequence, the unscaled recursion in mpmath
  (160 bits), i.e. the exact value.

It also runs the unscaled probability-space recursion in float64 on the
long sequence, where ``p(v_1..T)`` underflows to 0 (its log is ``-inf``),
while the log-space filter stays finite; and, with torch, takes the gradient
of the log-likelihood with respect to the transition logits: the forbidden
transitions (``-inf``) get exactly 0, not NaN.

    python examples/hmm_forward.py            # 8 states, 5000 steps
    python examples/hmm_forward.py --small    # 4 states, 1000 steps (what CI runs)

Exits 1 if any backend disagrees with the scaled float64 reference by more
than 1e-12 relative, or the first 60 steps with mpmath by more than the
contract allows them (4.5 ulps of ``log alpha_t`` per step, summed).
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from lse_dispatch import logmatmulexp, logsumexp


def make_model(states: int, steps: int, seed: int = 0):
    """Random HMM with some forbidden transitions, and a sampled observation sequence.

    Returns ``(log_pi, log_A, log_B, observations)``: initial, transition
    (rows: from, columns: to) and emission (states x symbols) log-probabilities.
    """
    rng = np.random.default_rng(seed)
    symbols = 3
    pi = rng.dirichlet(np.ones(states))
    transition = rng.dirichlet(np.ones(states), size=states)
    # Forbidden transitions: a band of zeros (every row keeps at least two states).
    for i in range(states):
        transition[i, (i + 2) % states] = 0.0 if states > 2 else transition[i, (i + 2) % states]
    transition /= transition.sum(axis=1, keepdims=True)
    emission = rng.dirichlet(np.ones(symbols), size=states)
    hidden = rng.choice(states, p=pi)
    observations = []
    for _ in range(steps):
        observations.append(rng.choice(symbols, p=emission[hidden]))
        hidden = rng.choice(states, p=transition[hidden])
    with np.errstate(divide="ignore"):
        return np.log(pi), np.log(transition), np.log(emission), np.array(observations)


def forward_log(xp, log_pi, log_a, log_b, observations):
    """``log p(v_1..T)`` by the log-space forward filter on ``logmatmulexp`` (any namespace, eager)."""
    log_alpha = log_pi + log_b[:, observations[0]]
    for symbol in observations[1:]:
        log_alpha = logmatmulexp(log_alpha, log_a) + log_b[:, symbol]
    return logsumexp(log_alpha)


def forward_jax(log_pi, log_a, log_b, observations):
    """The same filter as one ``lax.scan`` under ``jax.jit``."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(log_pi, log_a, log_b, observations):
        def step(log_alpha, symbol):
            return logmatmulexp(log_alpha, log_a) + log_b[:, symbol], None

        first = log_pi + log_b[:, observations[0]]
        last, _ = jax.lax.scan(step, first, observations[1:])
        return logsumexp(last)

    with jax.enable_x64(True):
        return float(run(*(jnp.asarray(v) for v in (log_pi, log_a, log_b, observations))))


def forward_scaled(log_pi, log_a, log_b, observations):
    """The scaled forward algorithm in float64: probabilities renormalised at every step."""
    pi, transition, emission = np.exp(log_pi), np.exp(log_a), np.exp(log_b)
    alpha = pi * emission[:, observations[0]]
    total = 0.0
    scale = alpha.sum()
    alpha /= scale
    log_scales = [math.log(scale)]
    for symbol in observations[1:]:
        alpha = (alpha @ transition) * emission[:, symbol]
        scale = alpha.sum()
        alpha /= scale
        log_scales.append(math.log(scale))
    total = math.fsum(log_scales)
    return total


def forward_unscaled(log_pi, log_a, log_b, observations):
    """Probability space without rescaling, in float64: underflows on long sequences."""
    pi, transition, emission = np.exp(log_pi), np.exp(log_a), np.exp(log_b)
    alpha = pi * emission[:, observations[0]]
    for symbol in observations[1:]:
        alpha = (alpha @ transition) * emission[:, symbol]
    with np.errstate(divide="ignore"):
        return float(np.log(alpha.sum()))


def forward_mpmath(log_pi, log_a, log_b, observations):
    """The exact log-likelihood (160-bit mpmath, no rescaling needed)."""
    import mpmath as mp

    with mp.workprec(160):
        exp = lambda v: mp.mpf(0) if v == -np.inf else mp.exp(mp.mpf(float(v)))  # noqa: E731
        pi = [exp(v) for v in log_pi]
        transition = [[exp(v) for v in row] for row in log_a]
        emission = [[exp(v) for v in row] for row in log_b]
        states = len(pi)
        alpha = [pi[i] * emission[i][observations[0]] for i in range(states)]
        for symbol in observations[1:]:
            alpha = [
                mp.fsum(alpha[i] * transition[i][j] for i in range(states)) * emission[j][symbol] for j in range(states)
            ]
        return mp.log(mp.fsum(alpha))


def torch_gradient(log_pi, log_a, log_b, observations):
    """d log p / d (transition logits) with torch: 0 at the forbidden transitions."""
    import torch

    log_a_t = torch.tensor(log_a, requires_grad=True)
    value = forward_log(torch, torch.tensor(log_pi), log_a_t, torch.tensor(log_b), torch.tensor(observations))
    (grad,) = torch.autograd.grad(value, log_a_t)
    return grad.numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="4 states, 1000 steps (the CI run)")
    parser.add_argument("--states", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    states = args.states or (4 if args.small else 8)
    steps = args.steps or (1000 if args.small else 5000)
    log_pi, log_a, log_b, observations = make_model(states, steps)
    failures = 0

    reference = forward_scaled(log_pi, log_a, log_b, observations)
    print(f"HMM: {states} states, {steps} steps, {int(np.sum(np.isinf(log_a)))} forbidden transitions")
    print(f"  scaled forward algorithm (float64):        {reference:.15g}")
    unscaled = forward_unscaled(log_pi, log_a, log_b, observations)
    print(f"  unscaled probability space (float64):      {unscaled}   (p underflows to 0)")

    results = {"numpy": float(forward_log(np, log_pi, log_a, log_b, observations))}
    try:
        import torch

        results["torch"] = float(
            forward_log(torch, *(torch.tensor(v) for v in (log_pi, log_a, log_b)), torch.tensor(observations))
        )
    except ImportError:
        print("  torch: not installed")
    try:
        results["jax (lax.scan, jit)"] = forward_jax(log_pi, log_a, log_b, observations)
    except ImportError:
        print("  jax: not installed")
    for name, value in results.items():
        relative = abs(value - reference) / abs(reference)
        ok = relative <= 1e-12
        failures += not ok
        print(f"  log-space filter on logmatmulexp, {name:<20} {value:.15g}  (rel. diff {relative:.1e}{'' if ok else ' FAIL'})")

    # Exact check on a short prefix of the same model.  Each step may add
    # the contract's 4 ulps (plus half an ulp for adding log B) to the
    # absolute error of log alpha, which the next step carries over unchanged
    # (its weights sum to 1): the bound is the sum of those over the steps.
    short = observations[:60]
    exact = forward_mpmath(log_pi, log_a, log_b, short)
    log_alpha = log_pi + log_b[:, short[0]]
    bound = 0.0
    for symbol in short[1:]:
        log_alpha = logmatmulexp(log_alpha, log_a) + log_b[:, symbol]
        bound += 4.5 * float(np.max(np.spacing(np.abs(log_alpha))))
    got = float(logsumexp(log_alpha))
    bound += 4 * float(np.spacing(abs(got)))
    error = float(abs(got - exact))
    ok = error <= bound
    failures += not ok
    print(
        f"  60 steps against mpmath: {got:.17g} vs {float(exact):.17g}: error {error:.2g} "
        f"({error / float(np.spacing(abs(got))):.2f} ulps; per-step contract bound {bound:.2g}){'' if ok else ' FAIL'}"
    )

    if "torch" in results:
        grad = torch_gradient(log_pi, log_a, log_b, observations)
        forbidden = np.isinf(log_a)
        finite = bool(np.all(np.isfinite(grad)))
        zero = bool(np.all(grad[forbidden] == 0))
        failures += not (finite and zero)
        print(f"  torch gradient w.r.t. log A: finite {finite}, exactly 0 at the forbidden transitions {zero}")
    print("ok" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
