"""Scaling laws: how loss falls with parameters N, tokens D and compute C ~= 6 N D.

Pure functions (numpy floats in, floats out) so the lesson, its widget and the tests share them.

* Kaplan et al. 2020 (arXiv 2001.08361): ``L(N) = (N_c/N)^alpha_N``, ``L(D) = (D_c/D)^alpha_D``,
  ``L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D`` (N without embeddings; loss in nats
  per token on WebText2 with GPT-2's BPE, so the constants belong to that data and tokenizer:
  the exponents are what transfer), and the compute-efficient size ``N ~= 1.3e9 C^0.73``
  (C in PF-days).
* Hoffmann et al. 2022, "Chinchilla" (arXiv 2203.15556), approach 3:
  ``L(N, D) = E + A/N^alpha + B/D^beta``. Minimising it under ``C = 6 N D`` gives
  ``N_opt = G (C/6)^(beta/(alpha+beta))``, ``D_opt = (C/6) / N_opt`` with
  ``G = (alpha A / (beta B))^(1/(alpha+beta))``.
* Besiroglu et al. 2024 (arXiv 2404.10102) refit approach 3 on data read off Hoffmann's plots
  and found the published (rounded) constants inconsistent with the paper's own approaches 1-2;
  their refit gives the familiar ~20 tokens per parameter.

:func:`fit_power_law` fits ``y = c * x^k`` (optionally above an irreducible ``offset``) by least
squares in log-log space, the way the papers draw their straight lines. Lesson 10's sweep of tiny
models that measures a law of your own is :mod:`course_lib.lessons.sweeps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PF_DAY = 1e15 * 24 * 3600  # FLOPs in one petaflop/s-day (Kaplan's compute unit)
TOKENS_PER_PARAM = 20.0  # the Chinchilla rule of thumb (approaches 1 and 2)
LAWS = ("chinchilla", "chinchilla_refit", "kaplan", "rule_of_thumb")


@dataclass(frozen=True)
class KaplanFit:
    """Constants of Kaplan et al. 2020 (Table 5 / eqs. 1.1-1.3, 1.5; Fig. 14 for the allocation)."""

    N_c: float = 8.8e13
    alpha_N: float = 0.076
    D_c: float = 5.4e13
    alpha_D: float = 0.095
    C_c: float = 3.1e8  # PF-days
    alpha_C: float = 0.050
    N_opt_coeff: float = 1.3e9  # N_opt = 1.3e9 * C_min^0.73, C_min in PF-days
    N_opt_exponent: float = 0.73


@dataclass(frozen=True)
class ChinchillaFit:
    """``L(N, D) = E + A / N^alpha + B / D^beta`` (N all parameters, D training tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float


KAPLAN = KaplanFit()
HOFFMANN_2022 = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU_2024 = ChinchillaFit(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def _positive(name: str, value: np.ndarray | float) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return arr


def _out(x: np.ndarray) -> np.ndarray | float:
    return float(x) if np.ndim(x) == 0 else x


def kaplan_loss_n(N: np.ndarray | float, fit: KaplanFit = KAPLAN) -> np.ndarray | float:
    """Kaplan's L(N): loss of a model with N non-embedding parameters trained to convergence."""
    return _out((fit.N_c / _positive("N", N)) ** fit.alpha_N)


def kaplan_loss_d(D: np.ndarray | float, fit: KaplanFit = KAPLAN) -> np.ndarray | float:
    """Kaplan's L(D): loss of a large model trained on D tokens with early stopping."""
    return _out((fit.D_c / _positive("D", D)) ** fit.alpha_D)


def kaplan_loss(N: np.ndarray | float, D: np.ndarray | float, fit: KaplanFit = KAPLAN) -> np.ndarray | float:
    """Kaplan's joint law ``L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D`` (eq. 1.5)."""
    N, D = _positive("N", N), _positive("D", D)
    return _out(((fit.N_c / N) ** (fit.alpha_N / fit.alpha_D) + fit.D_c / D) ** fit.alpha_D)


def kaplan_loss_compute(C: np.ndarray | float, fit: KaplanFit = KAPLAN) -> np.ndarray | float:
    """Kaplan's L(C_min) for ``C`` training FLOPs spent compute-efficiently (eq. 1.3)."""
    return _out((fit.C_c / (_positive("C", C) / PF_DAY)) ** fit.alpha_C)


def chinchilla_loss(
    N: np.ndarray | float, D: np.ndarray | float, fit: ChinchillaFit = HOFFMANN_2022
) -> np.ndarray | float:
    """Chinchilla's ``L(N, D) = E + A/N^alpha + B/D^beta`` (nats per token on MassiveText)."""
    N, D = _positive("N", N), _positive("D", D)
    return _out(fit.E + fit.A / N**fit.alpha + fit.B / D**fit.beta)


def training_flops(N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray | float:
    """``C = 6 N D``: forward (2 N) plus backward (4 N) FLOPs per token, times D tokens."""
    return _out(6.0 * _positive("N", N) * _positive("D", D))


def compute_optimal(C: float, law: str = "chinchilla") -> tuple[float, float]:
    """Compute-optimal ``(N, D)`` for a budget of ``C`` training FLOPs, with ``6 N D == C``.

    Args:
        C: training compute in FLOPs.
        law: ``"chinchilla"`` (Hoffmann et al. 2022 approach 3, the published constants),
            ``"chinchilla_refit"`` (Besiroglu et al. 2024's refit of the same approach),
            ``"kaplan"`` (``N = 1.3e9 C^0.73``, C in PF-days; D then follows from C = 6ND), or
            ``"rule_of_thumb"`` (D = 20 N, so N = sqrt(C / 120)).
    """
    C = float(_positive("C", C))
    if law in ("chinchilla", "chinchilla_refit"):
        f = HOFFMANN_2022 if law == "chinchilla" else BESIROGLU_2024
        G = (f.alpha * f.A / (f.beta * f.B)) ** (1.0 / (f.alpha + f.beta))
        N = G * (C / 6.0) ** (f.beta / (f.alpha + f.beta))
    elif law == "kaplan":
        N = KAPLAN.N_opt_coeff * (C / PF_DAY) ** KAPLAN.N_opt_exponent
    elif law == "rule_of_thumb":
        N = (C / (6.0 * TOKENS_PER_PARAM)) ** 0.5
    else:
        raise ValueError(f"unknown law {law!r}; choose one of {LAWS}")
    return N, C / (6.0 * N)


def gpu_hours(C: float, peak_flops: float = 989e12, mfu: float = 0.4) -> float:
    """Hours one GPU needs for ``C`` FLOPs at ``mfu`` of ``peak_flops`` (default: H100 bf16 at 40%)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return float(_positive("C", C)) / (float(_positive("peak_flops", peak_flops)) * mfu) / 3600.0


def allocation_table(C: float, fit: ChinchillaFit = HOFFMANN_2022) -> list[dict[str, float | str]]:
    """Every law's compute-optimal split of ``C`` FLOPs, with its loss under ``fit``.

    One row per law in :data:`LAWS`: ``{"law", "N", "D", "tokens_per_param", "loss"}``. Scoring
    every split with the same loss surface shows how little the loss changes between them.
    """
    rows = []
    for law in LAWS:
        N, D = compute_optimal(C, law)
        rows.append({"law": law, "N": N, "D": D, "tokens_per_param": D / N, "loss": chinchilla_loss(N, D, fit)})
    return rows


@dataclass(frozen=True)
class PowerLaw:
    """``y = offset + constant * x ** exponent``, fitted by :func:`fit_power_law`."""

    exponent: float
    constant: float
    offset: float = 0.0
    r2: float = 1.0  # coefficient of determination of the log-log line

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return _out(self.offset + self.constant * np.asarray(x, dtype=float) ** self.exponent)


def fit_power_law(x: np.ndarray, y: np.ndarray, offset: float = 0.0) -> PowerLaw:
    """Fit ``y = offset + c * x^k`` by least squares on ``log(y - offset) = log c + k log x``.

    A straight line on a log-log plot is a power law; its slope is the exponent. ``offset``
    (e.g. an irreducible loss ``E``) is subtracted first; every ``y`` must stay above it.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"x and y must be 1-D of the same length >= 2, got shapes {x.shape} and {y.shape}")
    _positive("x", x)
    if np.any(y - offset <= 0):
        raise ValueError(f"every y must exceed offset={offset} (the fit takes log(y - offset))")
    lx, ly = np.log(x), np.log(y - offset)
    k, logc = np.polyfit(lx, ly, 1)
    resid = ly - (logc + k * lx)
    total = np.sum((ly - ly.mean()) ** 2)
    r2 = 1.0 - np.sum(resid**2) / total if total > 0 else 1.0
    return PowerLaw(exponent=float(k), constant=float(np.exp(logc)), offset=float(offset), r2=float(r2))


def compute_frontier(
    N: np.ndarray, D: np.ndarray, loss: np.ndarray, n_bins: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lowest loss reachable at each compute budget, and the N that reaches it.

    From runs of several sizes, each evaluated at several token counts (``C = 6 N D`` per point),
    bin the budgets on a log scale and keep each bin's best point (Chinchilla's approach 1, in
    miniature). Returns ``(C, N_best, loss_best)`` sorted by compute, one entry per non-empty bin.
    """
    N, D, loss = (np.asarray(a, dtype=float) for a in (N, D, loss))
    if not (N.shape == D.shape == loss.shape) or N.ndim != 1:
        raise ValueError("N, D and loss must be 1-D arrays of the same length")
    C = training_flops(N, D)
    edges = np.logspace(np.log10(C.min()), np.log10(C.max()), n_bins + 1)
    which = np.clip(np.searchsorted(edges, C, side="right") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        idx = np.flatnonzero(which == b)
        if idx.size:
            best = idx[np.argmin(loss[idx])]
            rows.append((C[best], N[best], loss[best]))
    out = np.array(rows)
    return out[:, 0], out[:, 1], out[:, 2]
