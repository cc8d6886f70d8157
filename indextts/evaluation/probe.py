"""Linear probes: how much of a label (speaker, emotion) can a linear classifier read off embeddings?

A cross-validated logistic regression on standardised embeddings, scored on held-out folds. Its
accuracy means little alone, so the result carries both floors beside it: chance (1/K, what a
classifier guessing uniformly gets) and the majority class's share (what one always answering the
commonest label gets, which exceeds 1/K when classes are unbalanced). A probe that reads nothing
lands near chance on held-out folds, not at 0 and not at the training accuracy.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np

# Enough L-BFGS iterations for standardised embeddings of a few hundred dimensions to converge; a
# fold that still does not converge is reported in the note rather than warned about.
MAX_ITER = 2000


def probe_accuracy(X: np.ndarray, y: Sequence, *, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated accuracy of a linear probe predicting ``y`` from ``X``.

    ``StandardScaler`` + ``LogisticRegression`` in one pipeline (the scaler is fit on each training
    fold only), scored with ``StratifiedKFold(shuffle=True, random_state=seed)``. Every fold must
    hold every class in training and test, so: a class with a single member is dropped (it can be
    in training or test, not both), and ``folds`` falls to the smallest remaining class's size; the
    note says which happened.

    Args:
        X: ``[N, D]`` embeddings.
        y: ``N`` labels (any hashable values: speaker ids, emotion names).
        folds: cross-validation folds (at least 2).
        seed: the fold shuffle's seed.

    Returns:
        ``{"accuracy", "accuracy_std" (over folds), "folds", "n", "k", "chance" (1/k), "majority"
        (the largest class's share), "note" (str or None)}``, over the rows kept. With fewer than
        two classes left there is nothing to predict: ``accuracy`` and ``accuracy_std`` are None
        and the note says why.

    Raises:
        ValueError: ``X`` is not 2-D, ``y`` has another length, ``X`` holds NaN/inf, or ``folds`` < 2.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    labels = list(y)
    if X.ndim != 2:
        raise ValueError(f"probe_accuracy: X must be [N, D], got shape {X.shape}")
    if len(labels) != X.shape[0]:
        raise ValueError(f"probe_accuracy: {X.shape[0]} rows of X but {len(labels)} labels")
    if not np.isfinite(X).all():
        raise ValueError("probe_accuracy: X holds NaN or inf")
    if folds < 2:
        raise ValueError(f"probe_accuracy: folds must be at least 2, got {folds}")
    notes = []
    counts = Counter(labels)
    singles = sorted((str(c) for c, n in counts.items() if n < 2))
    if singles:
        notes.append(f"dropped {len(singles)} class(es) with one member ({', '.join(singles[:5])}"
                     f"{' ...' if len(singles) > 5 else ''})")
        keep = np.array([counts[c] >= 2 for c in labels])
        X, labels = X[keep], [c for c, k in zip(labels, keep) if k]
        counts = Counter(labels)
    n, k = len(labels), len(counts)
    result: dict[str, Any] = {"accuracy": None, "accuracy_std": None, "folds": 0, "n": n, "k": k,
                              "chance": 1.0 / k if k else None,
                              "majority": max(counts.values()) / n if n else None, "note": None}
    if k < 2:
        notes.append(f"{k} class{'es' if k != 1 else ''} with two or more members: nothing to predict")
        result["note"] = "; ".join(notes)
        return result
    smallest = min(counts.values())
    if smallest < folds:
        notes.append(f"{folds} folds reduced to {smallest}, the smallest class's size")
        folds = smallest
    # Class ids in a fixed order, so that label types sklearn cannot sort together still work.
    ids = {c: i for i, c in enumerate(sorted(counts, key=str))}
    target = np.array([ids[c] for c in labels])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        scores = cross_val_score(probe, X, target, cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
                                 scoring="accuracy")
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # anything else still reaches the caller
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if unconverged:
        notes.append(f"logistic regression did not converge in {MAX_ITER} iterations in {unconverged} fold(s)")
    result.update(accuracy=float(scores.mean()), accuracy_std=float(scores.std()), folds=folds,
                  note="; ".join(notes) or None)
    return result
