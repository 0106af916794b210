"""Masks, Wanda, magnitude and SparseGPT on synthetic least-squares problems with known answers."""

import pytest
import torch

from sparsellm.methods import Target, make_method
from sparsellm.methods.base import mask_from_scores, prune_count, smallest
from sparsellm.methods.sparsegpt import cholesky, damped_factors, group_smallest, hessian_factor, upper_inverse


def problem(rows=64, cols=128, tokens=2048, seed=0):
    """A weight matrix and correlated inputs (as real activations are), with X X^T / N."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    return W, X, X.T @ X / tokens


def stat_for(method, X, H):
    return {"hessian": H, "sqnorm": (X * X).mean(0), None: None}[method.statistic]


def output_error(W, Wp, X):
    return ((X @ (W - Wp).T) ** 2).sum().item() / ((X @ W.T) ** 2).sum().item()


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged():
    W, X, H = problem()
    pruned = make_method("sparsegpt").prune(W, H, Target(sparsity=0.0))
    assert torch.equal(pruned.weight, W)
    assert pruned.events == ()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity):
    W, X, H = problem()
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        method = make_method(name)
        errors[name] = output_error(W, method.prune(W, stat_for(method, X, H), Target(sparsity=sparsity)).weight, X)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.9 * errors["wanda"], errors  # a real margin, not a tie


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (3, 4), (1, 2), (4, 8), (40, 64)])  # M above the loop's sub-block
def test_nm_masks_are_exactly_n_of_m(name, n, m):
    W, X, H = problem()
    method = make_method(name)
    Wp = method.prune(W, stat_for(method, X, H), Target(n=n, m=m)).weight
    zeros_per_group = (Wp.reshape(W.shape[0], -1, m) == 0).sum(-1)
    assert torch.all(zeros_per_group == n)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(name, sparsity):
    W, X, H = problem(rows=48, cols=96)
    method = make_method(name)
    zeros = int((method.prune(W, stat_for(method, X, H), Target(sparsity=sparsity)).weight == 0).sum())
    per_row = name == "wanda"
    expected = W.shape[0] * prune_count(W.shape[1], sparsity) if per_row else prune_count(W.numel(), sparsity)
    assert zeros == expected


def test_wanda_equals_naive_reference():
    W, X, H = problem(rows=16, cols=32)
    method = make_method("wanda")
    Wp = method.prune(W, stat_for(method, X, H), Target(sparsity=0.5)).weight
    norms = [sum(X[t, j].item() ** 2 for t in range(X.shape[0])) ** 0.5 for j in range(W.shape[1])]
    for i in range(W.shape[0]):
        scores = [(abs(W[i, j].item()) * norms[j], j) for j in range(W.shape[1])]
        pruned = {j for _, j in sorted(scores)[:16]}
        for j in range(W.shape[1]):
            assert (Wp[i, j].item() == 0) == (j in pruned)
            if j not in pruned:
                assert Wp[i, j].item() == W[i, j].item()


def test_ties_are_broken_deterministically_and_counts_stay_exact():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = mask_from_scores(scores, Target(sparsity=0.5), per_row=True)
    assert mask.tolist() == [[True, True, True, False, False, False], [True, True, True, False, False, False]]
    grid = torch.round(torch.randn(32, 64) * 4) / 4  # a 4-bit-like grid: many equal magnitudes
    masks = [mask_from_scores(grid.abs(), Target(sparsity=0.6), per_row=False) for _ in range(2)]
    assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) == prune_count(grid.numel(), 0.6)


def test_smallest_equals_a_stable_sort():
    g = torch.Generator().manual_seed(5)
    for shape in ((7, 40), (3, 10, 4), (1, 300)):
        scores = torch.round(torch.randn(shape, generator=g) * 2)  # few distinct values: ties everywhere
        for k in range(shape[-1] + 1):
            expected = torch.zeros_like(scores, dtype=torch.bool)
            expected.scatter_(-1, torch.argsort(scores, dim=-1, stable=True)[..., :k], True)
            assert torch.equal(smallest(scores, k), expected), (shape, k)


def test_group_smallest_equals_smallest_with_ties():
    g = torch.Generator().manual_seed(6)
    for m in (2, 4, 8):
        later = torch.ones(m, m, dtype=torch.bool).tril(-1).unsqueeze(-1)
        scores = torch.round(torch.randn(m, 50, generator=g))  # few distinct values: ties everywhere
        for n in range(m + 1):
            assert torch.equal(group_smallest(scores, n, later), smallest(scores.T, n).T), (m, n)


def sparsegpt_reference(W, H, target, blocksize=128, percdamp=0.01):
    """The paper's Algorithm 1 without lazy batching, in float64: one full OBS update per column."""
    W, H = W.double().clone(), H.double()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
        H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype))), upper=True)  # fmt: skip
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        if i % blocksize == 0 and not target.is_nm:
            blk = slice(i, min(i + blocksize, cols))
            k = prune_count(rows * blk.stop, target.sparsity) - prune_count(rows * i, target.sparsity)
            mask[:, blk] = smallest((W[:, blk] ** 2 / torch.diag(U)[blk] ** 2).T.reshape(1, -1), k).reshape(-1, rows).T
        if target.is_nm and i % target.m == 0:
            grp = slice(i, i + target.m)
            mask[:, grp] = smallest(W[:, grp] ** 2 / torch.diag(U)[grp] ** 2, target.n)
        err = torch.where(mask[:, i], W[:, i], 0.0) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i][mask[:, i]] = 0.0
    return W, mask


@pytest.mark.parametrize("target", [Target(sparsity=0.7), Target(sparsity=0.5), Target(n=2, m=4), Target(n=3, m=4)])
def test_sparsegpt_equals_the_unbatched_algorithm(target):
    W, X, H = problem(rows=40, cols=300)  # 300 columns: two full blocks of 128 and a partial one
    ours = make_method("sparsegpt").prune(W, H, target).weight
    reference, mask = sparsegpt_reference(W, H, target)
    assert torch.equal(ours == 0, mask)
    assert (ours.double() - reference).abs().max() < 1e-4 * reference.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cholesky_refuses_a_non_finite_entry_off_the_diagonal(bad):
    """A bad entry off the diagonal is refused: it reaches its row's pivot (LAPACK then reports failure, and the
    factor's diagonal, which is all `cholesky` checks for NaN/Inf, holds it)."""
    H = 2 * torch.eye(6)
    H[4, 1] = H[1, 4] = bad
    assert cholesky(H) is None and cholesky(H, upper=True) is None
    assert cholesky(2 * torch.eye(6)) is not None


def test_singular_hessian_raises_damping_and_says_so():
    H = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalues 2.05 and -0.05: the base damping 0.01 fails
    (U, _), events = damped_factors(H, percdamp=0.01)
    assert len(events) == 1 and "raising damping" in events[0].detail and events[0].kind == "cholesky_damping_raised"
    expected = torch.linalg.cholesky(torch.linalg.inv(H + 0.1 * torch.eye(2)), upper=True)
    assert torch.allclose(U, expected, atol=1e-5)


def test_upper_inverse_by_halves_equals_the_inverse():
    r = torch.randn(300, 300, generator=torch.Generator().manual_seed(2)).triu() + 20 * torch.eye(300)
    for leaf in (256, 16, 1):  # one split, several levels, down to 1 x 1
        assert torch.allclose(upper_inverse(r, leaf).double(), torch.linalg.inv(r.double()), atol=1e-6)
        assert torch.equal(upper_inverse(r, leaf).tril(-1), torch.zeros(300, 300))


def test_u_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """On a 600-input Hessian (the triangular inverse splits): U^T U = (H + damp I)^-1, U upper, as the fp64
    Cholesky factor of the inverse."""
    _, _, H = problem(rows=4, cols=600, tokens=2400)
    (U, _), events = damped_factors(H, percdamp=0.01)
    damped = H.double() + 0.01 * torch.diag(H).double().mean() * torch.eye(600, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert events == [] and torch.equal(U.tril(-1), torch.zeros(600, 600))
    assert (U.double() - expected).norm() / expected.norm() < 1e-5


@pytest.mark.parametrize("singular", [False, True])
def test_factor_solves_with_the_damped_hessian(singular):
    """Factor.solve gives R (H + damp I)^-1 (fp64 reference), the damping raised where H needs it, dead inputs
    (H_jj = 0) taken as H_jj = 1; its U is the one SparseGPT gets without solves."""
    _, X, H = problem(rows=8, cols=48, tokens=256)
    H[5, :] = H[:, 5] = 0.0  # a dead input
    if singular:
        H[7, 9] = H[9, 7] = 1.5 * (H[7, 7] * H[9, 9]).sqrt()  # indefinite: the base damping fails
    R = torch.randn(8, 48, generator=torch.Generator().manual_seed(1))
    factor = hessian_factor(H, percdamp=0.01, solves=True)
    raised = len(factor.events)
    assert (raised > 0) == singular and torch.equal(factor.U, hessian_factor(H, percdamp=0.01).U)
    damped = H.double().clone()
    damped[5, 5] = 1.0
    damped += 0.01 * 10**raised * torch.diag(damped).mean() * torch.eye(48, dtype=torch.float64)
    reference = R.double() @ torch.linalg.inv(damped)
    assert (factor.solve(R).double() - reference).norm() / reference.norm() < 1e-5
