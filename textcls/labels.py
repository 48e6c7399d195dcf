"""Label sets: which class names a dataset or model has, and whether two agree.

A dataset's labels are plain class ids (``label_names`` None) or named
(``label_names[i]`` names class ``i``); a model carries the label set of the
data it was trained on. One rule decides whether a model may be evaluated on
a dataset, continue training on it, score it, or replace the served model:
:func:`label_set_problem`. The API refuses a job with it before anything is
stored, the workers check again at run time, and promotion uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session

from textcls.models import Dataset, Model


def names_or_ids(names: Sequence[str] | None, num_labels: int) -> list[str]:
    """The name of every class id; an unnamed class is named by its id (``"0"``...)."""
    return list(names) if names is not None else [str(i) for i in range(num_labels)]


def _show(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def label_set_problem(model: Model, dataset: Dataset) -> str | None:
    """Why ``model`` cannot be used with ``dataset``'s labels, or None if it can.

    Plain ids on both sides: the dataset's ids must be the model's outputs
    (its ``num_labels`` at most the model's). Named on both sides: the same
    names in the same order. One side named and the other not: refused, since
    nothing says which name an id means.
    """
    if not dataset.labelled:
        return f"dataset {dataset.id} is unlabelled text (no label column)"
    m_names, d_names = model.label_names, dataset.label_names
    if m_names is None and d_names is None:
        if dataset.num_labels > model.num_labels:
            return (
                f"dataset {dataset.id} has labels up to {dataset.num_labels - 1} but model "
                f"{model.id} has {model.num_labels} labels"
            )
        return None
    if m_names is None or d_names is None:
        named, plain = (
            (f"model {model.id}", f"dataset {dataset.id}")
            if m_names is not None
            else (f"dataset {dataset.id}", f"model {model.id}")
        )
        return (
            f"{named} names its labels {_show(m_names or d_names or [])} but {plain} has plain "
            "class ids: upload the dataset with the model's label_names"
        )
    if list(m_names) != list(d_names):
        return (
            f"model {model.id} was trained on labels {_show(m_names)} but dataset {dataset.id} "
            f"has labels {_show(d_names)}: upload it with label_names set to the model's names "
            "(same names, same order)"
        )
    return None


def same_label_set(a: Model, b: Model) -> bool:
    """Whether two models give the same class ids the same meaning."""
    return a.num_labels == b.num_labels and names_or_ids(
        a.label_names, a.num_labels
    ) == names_or_ids(b.label_names, b.num_labels)


def dataset_pair_problem(first: Dataset, other: Dataset) -> str | None:
    """Why two labelled datasets cannot train and evaluate one model, or None."""
    if not other.labelled:
        return f"dataset {other.id} is unlabelled text (no label column)"
    if first.label_names is None and other.label_names is None:
        return None
    if first.label_names != other.label_names:
        a = names_or_ids(first.label_names, first.num_labels)
        b = names_or_ids(other.label_names, other.num_labels)
        return (
            f"dataset {first.id} has labels {_show(a)} but dataset {other.id} has {_show(b)}: "
            "upload it with the same label_names (same names, same order)"
        )
    return None


# Per job kind: the dataset parameters whose labels the job uses (the others,
# such as export's check sentences or predict's input, may be unlabelled).
LABELLED_DATASETS: dict[str, tuple[str, ...]] = {
    "train": ("dataset_id", "eval_dataset_id"),
    "prune": ("dataset_id",),
    "distill": ("dataset_id", "eval_dataset_id"),
    "evaluate": ("dataset_id",),
    "pipeline": ("dataset_id", "eval_dataset_id"),
}
SOURCE_MODELS = ("model_id", "teacher_model_id")


def job_label_problems(session: Session, kind: str, params: object) -> dict[str, str]:
    """``{parameter: why}`` for every dataset whose labels the job cannot use.

    Each labelled dataset is checked against the job's source model where it
    has one, else against the job's first dataset. Missing rows are left to the
    caller's existence check.
    """
    model: Model | None = None
    for name in SOURCE_MODELS:
        if (value := getattr(params, name, None)) is not None:
            model = session.get(Model, value)
    problems: dict[str, str] = {}
    first: Dataset | None = None
    for name in LABELLED_DATASETS.get(kind, ()):
        value = getattr(params, name, None)
        ds = session.get(Dataset, value) if value is not None else None
        if ds is None:
            continue
        if model is not None:
            problem = label_set_problem(model, ds)
        elif first is not None:
            problem = dataset_pair_problem(first, ds)
        else:
            problem = None if ds.labelled else f"dataset {ds.id} is unlabelled text"
        if problem:
            problems[name] = f"{kind} needs labels that fit: {problem}"
        first = first or ds
    return problems
