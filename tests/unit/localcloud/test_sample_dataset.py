"""The demo's generated dataset must pass the same rules an upload to S3 meets, and show what it says."""

from pathlib import Path

from loraflow_diffusion.toy_world.judge import read
from loraflow_local.sample_dataset import PREVIEW_PROMPTS, SAMPLE_DATASET_ID, SUBJECTS, write_sample_dataset
from loraflow_shared.dataset.local import list_local_objects, local_directory_reader
from loraflow_shared.dataset.validate import validate_dataset
from PIL import Image


def _validate(root: Path):
    return validate_dataset(
        SAMPLE_DATASET_ID, list_local_objects(root, SAMPLE_DATASET_ID), local_directory_reader(root)
    )


def test_given_sample_dataset_when_validated_then_accepted_with_two_subsets(tmp_path: Path) -> None:
    write_sample_dataset(tmp_path, max_train_steps=30)

    report = _validate(tmp_path)

    assert report.errors == []
    assert [(s.folder, s.repeats, s.class_name) for s in report.subsets] == [
        ("10_dwjz", 10, None),
        ("20_zqxj square", 20, "square"),
    ]
    assert report.image_count == 12
    assert report.ignored_keys == ["xformers"]
    assert report.config is not None and report.config.max_train_steps == 30
    assert report.config.loraflow.preview_prompts == list(PREVIEW_PROMPTS)


def test_given_subject_pictures_when_read_back_then_each_shows_its_subject(tmp_path: Path) -> None:
    dataset = write_sample_dataset(tmp_path)

    for trigger, (folder, subject, extension, count) in SUBJECTS.items():
        pictures = sorted((dataset / folder).glob(f"*.{extension}"))
        assert len(pictures) == count
        for picture in pictures:
            reading = read(Image.open(picture))
            assert reading.agrees(subject, "colour", "shape", "size", "background"), (picture, reading)
        assert (dataset / folder / "img00.txt").read_text(encoding="utf-8") == f"a photo of {trigger}"


def test_given_sample_dataset_when_written_twice_then_identical_bytes(tmp_path: Path) -> None:
    first = write_sample_dataset(tmp_path / "a")
    second = write_sample_dataset(tmp_path / "b")

    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
