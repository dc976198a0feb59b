"""Set-to-set metrics on feature arrays: FID, KID, precision/recall/density/coverage, diversity, copies.

Pure numpy/scipy on (N, D) feature matrices, so every metric is computed once per feature space and
per condition from cached features, and tests can check each one on hand-made points.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist, pdist


def _check(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs an (N, D) array with N >= {min_rows}, got shape {x.shape}")
    return x


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (Heusel et al. 2017): |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2).

    With A = centred features / sqrt(n-1), S1 S2 = A1'A1 A2'A2 has the eigenvalues of M M' for
    M = A1 A2', so tr sqrt(S1 S2) is M's nuclear norm: exact, and stable when n < D (where sqrtm of
    the rank-deficient D x D product is not).
    """
    real, fake = _check(real, "real", 2), _check(fake, "fake", 2)
    a1 = (real - real.mean(0)) / np.sqrt(len(real) - 1)
    a2 = (fake - fake.mean(0)) / np.sqrt(len(fake) - 1)
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    mean_term = float(np.sum((real.mean(0) - fake.mean(0)) ** 2))
    value = mean_term + float(np.sum(a1**2) + np.sum(a2**2) - 2 * cross)
    return max(value, 0.0)


def _mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    d, m = x.shape[1], len(x)
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kernel_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID mean and std over random subsets, as torchmetrics and the KID paper compute it.

    The subset size shrinks to the smaller set, so small per-condition sets still get a value; when
    both sets fit in one subset, every subset is the same and one is computed.
    """
    real, fake = _check(real, "real", 2), _check(fake, "fake", 2)
    m = min(subset_size, len(real), len(fake))
    if m == len(real) == len(fake):
        return _mmd2_poly(real, fake), 0.0
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_poly(real[rng.choice(len(real), m, replace=False)], fake[rng.choice(len(fake), m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def knn_radii(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the sample's manifold ball radius)."""
    radii = np.empty(len(x))
    for start in range(0, len(x), chunk):
        d = cdist(x[start : start + chunk], x)
        d[np.arange(len(d)), np.arange(start, start + len(d))] = np.inf
        radii[start : start + chunk] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def manifold_metrics(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls (Naeem et al. 2020, "Reliable fidelity
    and diversity metrics"): precision/density ask whether fakes fall in real balls, recall whether
    reals fall in fake balls, coverage whether each real ball holds at least one fake."""
    real, fake = _check(real, "real", k + 1), _check(fake, "fake", k + 1)
    real_r, fake_r = knn_radii(real, k), knn_radii(fake, k)
    d = cdist(real, fake)  # (n_real, n_fake)
    in_real_ball = d <= real_r[:, None]
    in_fake_ball = d <= fake_r[None, :]
    return {
        "precision": float(in_real_ball.any(axis=0).mean()),
        "recall": float(in_fake_ball.any(axis=1).mean()),
        "density": float(in_real_ball.sum() / (k * len(fake))),
        "coverage": float((d.min(axis=1) <= real_r).mean()),
    }


def diversity(x: np.ndarray) -> float:
    """Mean pairwise Euclidean feature distance: low when a generator repeats itself."""
    return float(pdist(_check(x, "features", 2)).mean())


def nearest(reference: np.ndarray, queries: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index and distance of each query's nearest reference row, in chunks to bound memory."""
    idx = np.empty(len(queries), dtype=np.int64)
    dist = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        d = cdist(queries[start : start + chunk], reference)
        idx[start : start + chunk] = d.argmin(axis=1)
        dist[start : start + chunk] = d.min(axis=1)
    return idx, dist


def memorisation(real: np.ndarray, fake: np.ndarray, copy_ratio: float = 0.5) -> dict[str, np.ndarray]:
    """Each fake's nearest real image, its distance, and a copy flag.

    A fake is flagged when it is closer to its nearest real image than ``copy_ratio`` times that real
    image's distance to its own nearest real neighbour: "much closer than any other real photograph is"
    scales with how crowded that part of the data is. ``<=`` flags exact copies even of duplicated reals.
    """
    real, fake = _check(real, "real", 2), _check(fake, "fake", 1)
    idx, dist = nearest(real, fake)
    real_nn = knn_radii(real, 1)[idx]
    return {
        "nearest": idx,
        "distance": dist,
        "real_nn_distance": real_nn,
        "ratio": dist / np.maximum(real_nn, 1e-12),
        "flagged": dist <= copy_ratio * real_nn,
    }
