"""A dataset folder on disk, checked with the upload Lambda's own rules (`loraflow_shared.dataset`), and
the per-file report printed as the job's errors and warnings would read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loraflow_shared.dataset.local import list_local_objects, local_directory_reader
from loraflow_shared.dataset.validate import ValidationReport, validate_dataset


def validate_folder(folder: Path, dataset: str | None = None) -> ValidationReport:
    """`folder` validated as the dataset `dataset` (default: the folder's name)."""
    folder = folder.resolve()
    report = validate_dataset(
        folder.name, list_local_objects(folder.parent, folder.name), local_directory_reader(folder.parent)
    )
    return report if dataset is None else report.model_copy(update={"dataset": dataset})


def print_report(report: ValidationReport, say: Callable[[str], None] = print) -> None:
    for label, problems in (("error", report.errors), ("warning", report.warnings)):
        for problem in problems:
            say(f"{label:7} {problem.code.value:20} {problem.path or '.'}: {problem.message}")
    subsets = (
        ", ".join(f"{s.folder} ({s.image_count} images x {s.repeats})" for s in report.subsets) or "none"
    )
    # The image count includes regularization images: name their folders too, so the sum adds up.
    reg = ", ".join(f"{s.folder} ({s.image_count} images)" for s in report.reg_subsets)
    verdict = "accepted" if report.accepted else "rejected"
    say(
        f"{report.dataset}: {verdict}; {report.image_count} images; subsets: {subsets}; "
        + (f"regularization: {reg}; " if reg else "")
        + f"config: {report.config_file or 'none'}"
    )
