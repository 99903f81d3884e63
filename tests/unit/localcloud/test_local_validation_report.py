"""The one-line summary `loraflow train` prints for a checked folder: its counts add up."""

from pathlib import Path

from loraflow_local.local_validation import print_report, validate_folder
from loraflow_local.sample_dataset import write_sample_dataset


def test_given_dataset_with_regularization_images_when_reported_then_their_folder_is_named(
    tmp_path: Path,
) -> None:
    lines: list[str] = []

    print_report(validate_folder(write_sample_dataset(tmp_path)), say=lines.append)

    summary = lines[-1]
    assert summary.startswith("0001-dataset: accepted; 16 images; subsets: ")
    assert "10_dwjz (5 images x 10)" in summary and "10_dwjz shape (5 images x 10)" in summary
    assert "; regularization: reg/1_shape (6 images); config: kohya-sdxl-config.toml" in summary


def test_given_dataset_without_regularization_images_when_reported_then_none_mentioned(
    tmp_path: Path,
) -> None:
    dataset = write_sample_dataset(tmp_path)
    for image in (dataset / "reg" / "1_shape").iterdir():
        image.unlink()
    (dataset / "reg" / "1_shape").rmdir()
    (dataset / "reg").rmdir()
    lines: list[str] = []

    print_report(validate_folder(dataset), say=lines.append)

    assert lines[-1].startswith("0001-dataset: accepted; 10 images; subsets: ")
    assert "regularization" not in lines[-1]
