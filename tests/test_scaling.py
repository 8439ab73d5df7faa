"""Scaling laws (course_lib.scaling) against the papers' numbers and brute-force optimisation."""

import math

import numpy as np
import pytest

from course_lib.lessons.sweeps import sweep_table
from course_lib.scaling import (
    BESIROGLU_2024,
    HOFFMANN_2022,
    KAPLAN,
    LAWS,
    PF_DAY,
    allocation_table,
    chinchilla_loss,
    compute_frontier,
    compute_optimal,
    fit_power_law,
    gpu_hours,
    kaplan_loss,
    kaplan_loss_compute,
    kaplan_loss_d,
    kaplan_loss_n,
    training_flops,
)


def test_published_constants():
    assert (KAPLAN.N_c, KAPLAN.alpha_N, KAPLAN.D_c, KAPLAN.alpha_D) == (8.8e13, 0.076, 5.4e13, 0.095)
    assert (HOFFMANN_2022.E, HOFFMANN_2022.A, HOFFMANN_2022.B) == (1.69, 406.4, 410.7)
    assert (HOFFMANN_2022.alpha, HOFFMANN_2022.beta) == (0.34, 0.28)


def test_kaplan_laws():
    # doubling N multiplies the loss by 2^-0.076, ten times the data by 10^-0.095
    assert kaplan_loss_n(2e9) / kaplan_loss_n(1e9) == pytest.approx(2**-0.076)
    assert kaplan_loss_d(1e11) / kaplan_loss_d(1e10) == pytest.approx(10**-0.095)
    assert kaplan_loss_n(KAPLAN.N_c) == pytest.approx(1.0)
    # the joint law reduces to L(N) with unlimited data and to L(D) with an unlimited model
    assert kaplan_loss(1e9, 1e30) == pytest.approx(kaplan_loss_n(1e9), rel=1e-6)
    assert kaplan_loss(1e30, 1e10) == pytest.approx(kaplan_loss_d(1e10), rel=1e-6)
    assert kaplan_loss_compute(KAPLAN.C_c * PF_DAY) == pytest.approx(1.0)
    np.testing.assert_allclose(kaplan_loss_n(np.array([1e8, 1e9])), [(8.8e13 / 1e8) ** 0.076, (8.8e13 / 1e9) ** 0.076])


def test_chinchilla_loss_by_hand():
    N, D = 70e9, 1.4e12
    assert chinchilla_loss(N, D) == pytest.approx(1.69 + 406.4 / N**0.34 + 410.7 / D**0.28)
    assert chinchilla_loss(1e30, 1e30) == pytest.approx(HOFFMANN_2022.E)


@pytest.mark.parametrize("law", ["chinchilla", "chinchilla_refit"])
@pytest.mark.parametrize("C", [1e18, 1e21, 5.76e23])
def test_compute_optimal_minimises_the_loss_on_the_budget(law, C):
    fit = HOFFMANN_2022 if law == "chinchilla" else BESIROGLU_2024
    N, D = compute_optimal(C, law)
    assert 6 * N * D == pytest.approx(C)
    # brute force: every split of the same budget along a fine grid of N is no better
    grid = np.logspace(math.log10(N) - 2, math.log10(N) + 2, 4001)
    losses = chinchilla_loss(grid, C / (6 * grid), fit)
    assert chinchilla_loss(N, D, fit) <= losses.min() + 1e-12
    assert grid[np.argmin(losses)] == pytest.approx(N, rel=3e-3)


def test_compute_optimal_scaling_exponents_and_rules():
    # approach 3: N_opt grows as C^(beta/(alpha+beta)) = C^0.4516
    (n1, _), (n2, _) = compute_optimal(1e20), compute_optimal(1e22)
    assert math.log(n2 / n1) / math.log(100) == pytest.approx(0.28 / 0.62)
    # Kaplan's allocation puts most extra compute into the model: N ~ C^0.73
    (k1, _), (k2, _) = compute_optimal(1e20, "kaplan"), compute_optimal(1e22, "kaplan")
    assert math.log(k2 / k1) / math.log(100) == pytest.approx(0.73)
    assert compute_optimal(PF_DAY, "kaplan")[0] == pytest.approx(1.3e9)
    # rule of thumb: 20 tokens per parameter on the budget
    N, D = compute_optimal(1e21, "rule_of_thumb")
    assert D / N == pytest.approx(20.0) and 6 * N * D == pytest.approx(1e21)
    # the refit agrees with the rule of thumb at Chinchilla's budget (70B on 1.4T: 5.76e23 FLOPs)...
    N, D = compute_optimal(5.76e23, "chinchilla_refit")
    assert 15 < D / N < 25 and 50e9 < N < 90e9
    # ... while the published approach-3 constants ask for several times more tokens per parameter
    N, D = compute_optimal(5.76e23, "chinchilla")
    assert D / N > 60
    with pytest.raises(ValueError, match="unknown law"):
        compute_optimal(1e20, "gopher")
    with pytest.raises(ValueError, match="positive"):
        compute_optimal(-1.0)
    assert set(LAWS) == {"chinchilla", "chinchilla_refit", "kaplan", "rule_of_thumb"}


def test_training_flops():
    assert training_flops(70e9, 1.4e12) == pytest.approx(5.88e23)


def test_fit_power_law_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    x = np.logspace(3, 7, 25)
    y = 12.0 * x**-0.3 * np.exp(rng.normal(0, 0.01, x.size))  # 1% multiplicative noise
    fit = fit_power_law(x, y)
    assert fit.exponent == pytest.approx(-0.3, abs=0.01)
    assert fit.constant == pytest.approx(12.0, rel=0.1)
    assert fit.r2 > 0.99
    np.testing.assert_allclose(fit(x), 12.0 * x**-0.3, rtol=0.05)
    # exact data is recovered exactly, also above an irreducible offset
    exact = fit_power_law(x, 1.5 + 3.0 * x**-0.5, offset=1.5)
    assert exact.exponent == pytest.approx(-0.5) and exact.constant == pytest.approx(3.0)
    assert exact(1e4) == pytest.approx(1.5 + 3.0 * 1e4**-0.5)


def test_fit_power_law_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="exceed offset"):
        fit_power_law([1, 2, 3], [1, 2, 3], offset=2.0)


def test_compute_frontier_finds_the_best_size_per_budget():
    # runs of three sizes on the Chinchilla surface, each evaluated at many token counts
    Ns = np.array([1e7, 1e8, 1e9])
    N = np.repeat(Ns, 40)
    D = np.tile(np.logspace(8, 12, 40), 3)
    loss = chinchilla_loss(N, D)
    C, N_best, L_best = compute_frontier(N, D, loss, n_bins=6)
    assert np.all(np.diff(C) > 0) and np.all(np.diff(L_best) < 0)  # more compute, lower best loss
    assert N_best[0] == 1e7 and N_best[-1] == 1e9  # small budgets favour small models
    # each entry is the best run among all runs whose compute falls in the same log-spaced bin
    all_C = 6 * N * D
    edges = np.logspace(np.log10(all_C.min()), np.log10(all_C.max()), 7)
    for c, l in zip(C, L_best, strict=True):
        i = min(int(np.sum(edges <= c)) - 1, 5)
        in_bin = [loss[j] for j in range(N.size) if edges[i] <= all_C[j] and (all_C[j] < edges[i + 1] or i == 5)]
        assert l == min(in_bin)


def test_allocation_table_and_gpu_hours():
    rows = allocation_table(1e21)
    assert [r["law"] for r in rows] == list(LAWS)
    for r in rows:
        assert (r["N"], r["D"]) == pytest.approx(compute_optimal(1e21, r["law"]))
        assert r["loss"] == pytest.approx(chinchilla_loss(r["N"], r["D"]))
    # the published approach-3 split is, by construction, the lowest loss on its own surface
    assert min(rows, key=lambda r: r["loss"])["law"] == "chinchilla"
    # 989 TFLOP/s at 40% for one hour is 1.424e18 FLOPs
    assert gpu_hours(989e12 * 0.4 * 3600) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mfu"):
        gpu_hours(1e20, mfu=1.5)


def test_compute_budget_widget_shows_the_pure_functions_numbers():
    widgets = pytest.importorskip("course_lib.widgets")
    text = widgets.compute_budget_html(23.0)
    N, D = compute_optimal(1e23, "rule_of_thumb")
    assert widgets._si(N) in text and widgets._si(D) in text
    assert f"{gpu_hours(1e23):,.0f} H100-hours" in text
    box = widgets.compute_budget_widget(21.0)
    slider, result = box.children
    assert result.value == widgets.compute_budget_html(21.0)
    slider.value = 24.0
    assert result.value == widgets.compute_budget_html(24.0)
    assert widgets._si(7e10) == "70.0 B" and widgets._si(512) == "512"


def test_sweep_table_flattens_runs():
    runs = [{"params": 10, "params_non_embedding": 8, "points": [{"tokens": 100, "val_loss": 3.0},
                                                                   {"tokens": 200, "val_loss": 2.5}]},
            {"params": 40, "params_non_embedding": 30, "points": [{"tokens": 100, "val_loss": 2.8}]}]
    N, D, L = sweep_table(runs)
    assert N.tolist() == [10, 10, 40] and D.tolist() == [100, 200, 100] and L.tolist() == [3.0, 2.5, 2.8]
    assert sweep_table(runs, non_embedding=True)[0].tolist() == [8, 8, 30]
    with pytest.raises(ValueError, match="no evaluation points"):
        sweep_table([])


@pytest.mark.slow
def test_sweep_point_trains_and_reports_a_validation_curve():
    from course_lib.lessons.sweeps import SweepSize, sweep_point
    from course_lib.model import GPT, GPTConfig

    run = sweep_point(SweepSize(1, 16, 2), steps=30, eval_every=10, batch_size=8, block_size=32, threads=None)
    assert [p["step"] for p in run["points"]] == [10, 20, 30]
    assert [p["tokens"] for p in run["points"]] == [10 * 8 * 32, 20 * 8 * 32, 30 * 8 * 32]
    losses = [p["val_loss"] for p in run["points"]]
    assert losses[-1] < losses[0]  # it learns
    vocab = run["params"] - run["params_non_embedding"] - 32 * 16  # embedding rows = vocabulary size
    model = GPT(GPTConfig(vocab_size=vocab // 16, block_size=32, n_layer=1, n_embd=16, n_head=2))
    assert model.num_params() == run["params"]
