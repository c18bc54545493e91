"""Cross-validation folds over the sections of a manifest, and the no-leakage check."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from napari_stpredict.errors import StPredictError

__all__ = ["CV_MODES", "Fold", "LeakageError", "check_no_leakage", "make_folds"]

CV_MODES: tuple[str, ...] = ("leave-one-section-out", "leave-one-patient-out")


class LeakageError(StPredictError):
    """A held-out section entered a model's training set or reference bank."""


@dataclass(frozen=True)
class Fold:
    """One split: train on ``train``, score on ``test`` (disjoint section names)."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        both = set(self.train) & set(self.test)
        if both:
            raise LeakageError(f"fold {self.name}: sections {sorted(both)} are in train and test")


def _name(s: Any) -> str:
    return s if isinstance(s, str) else str(s.name)


def _patient(s: Any) -> str | None:
    p = None if isinstance(s, str) else getattr(s, "patient", None)
    return None if p is None or str(p) == "" else str(p)


def make_folds(
    sections: Sequence[Any],
    *,
    cv: str = "leave-one-section-out",
    test_sections: Sequence[str] | None = None,
) -> list[Fold]:
    """Build the folds of a cross-validation.

    Parameters
    ----------
    sections
        Section specs of a manifest (objects with ``name`` and optional ``patient``) or names.
    cv
        ``"leave-one-section-out"``: one fold per section; ``"leave-one-patient-out"``: one fold
        per patient (every section needs a ``patient``), in order of first appearance.
    test_sections
        Instead of a cross-validation, one fold testing these sections and training on the rest.

    Returns
    -------
    list[Fold]

    Raises
    ------
    StPredictError
        Unknown mode, fewer than two sections/patients, duplicate names, a section without a
        patient in patient mode, or an unknown test section.
    """
    names = [_name(s) for s in sections]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StPredictError(f"sections: duplicate names {dup}")
    if len(names) < 2:
        raise StPredictError(
            f"sections: cross-validation needs at least 2 sections, got {len(names)}"
        )
    if test_sections is not None:
        test = list(dict.fromkeys(test_sections))
        unknown = [t for t in test if t not in names]
        if unknown:
            raise StPredictError(f"--test-sections: unknown sections {unknown} (have {names})")
        if not test:
            raise StPredictError("--test-sections: no section given")
        train = tuple(n for n in names if n not in test)
        return [Fold(name="+".join(test), train=train, test=tuple(test))]
    if cv == "leave-one-section-out":
        return [Fold(name=n, train=tuple(m for m in names if m != n), test=(n,)) for n in names]
    if cv == "leave-one-patient-out":
        patients = [_patient(s) for s in sections]
        lacking = [n for n, p in zip(names, patients, strict=True) if p is None]
        if lacking:
            raise StPredictError(
                f"--cv leave-one-patient-out: sections {lacking} have no 'patient' in the manifest"
            )
        order = list(dict.fromkeys(patients))
        if len(order) < 2:
            raise StPredictError(
                f"--cv leave-one-patient-out: needs at least 2 patients, got {len(order)}"
            )
        folds = []
        for p in order:
            test = tuple(n for n, q in zip(names, patients, strict=True) if q == p)
            train = tuple(n for n, q in zip(names, patients, strict=True) if q != p)
            folds.append(Fold(name=f"patient {p}", train=train, test=test))
        return folds
    raise StPredictError(f"--cv {cv!r}: unknown mode (use one of {', '.join(CV_MODES)})")


def check_no_leakage(
    test: Iterable[str],
    *,
    training_sections: Iterable[str] | None,
    bank_sections: Iterable[str] | None,
    what: str = "model",
) -> None:
    """Raise :class:`LeakageError` if a test section trained the model or is in its bank.

    ``training_sections`` is the model file's list; ``bank_sections`` the section name of each
    reference-bank spot (``None`` for a model without a bank, e.g. regression). A model that
    does not record its training sections cannot be checked and is refused.
    """
    test_set = set(test)
    if training_sections is None:
        raise LeakageError(f"{what}: the model file does not list its training sections")
    leaked = test_set & set(training_sections)
    if leaked:
        raise LeakageError(f"{what}: held-out sections {sorted(leaked)} were used for training")
    if bank_sections is not None:
        in_bank = test_set & set(bank_sections)
        if in_bank:
            raise LeakageError(
                f"{what}: held-out sections {sorted(in_bank)} have spots in the reference bank"
            )
