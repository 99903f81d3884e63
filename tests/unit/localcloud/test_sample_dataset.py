"""The demo's generated dataset must pass the same rules an upload to S3 meets, and show what it says."""

from pathlib import Path

from loraflow_diffusion.toy_world.judge import read
from loraflow_local.sample_dataset import (
    FOLDERS,
    PREVIEW_PROMPTS,
    SAMPLE_DATASET_ID,
    TRIGGER,
    write_sample_dataset,
)
from loraflow_shared.dataset.local import list_local_objects, local_directory_reader
from loraflow_shared.dataset.validate import validate_dataset
from PIL import Image


def _validate(root: Path):
    return validate_dataset(
        SAMPLE_DATASET_ID, list_local_objects(root, SAMPLE_DATASET_ID), local_directory_reader(root)
    )


def test_given_sample_dataset_when_validated_then_accepted_with_its_subsets(tmp_path: Path) -> None:
    write_sample_dataset(tmp_path, max_train_steps=30)

    report = _validate(tmp_path)

    assert report.errors == []
    summaries = report.subsets
    subsets = sorted((s.folder, s.repeats, s.class_name, s.image_count, s.caption_count) for s in summaries)
    assert subsets == [("10_dwjz", 10, None, 5, 4), ("10_dwjz shape", 10, "shape", 5, 4)]
    reg = [(s.folder, s.image_count, s.caption_count) for s in report.reg_subsets]
    assert reg == [("reg/1_shape", 6, 6)]
    assert (report.image_count, report.reg_image_count) == (5 + 5 + 6, 6)
    assert report.ignored_keys == ["xformers"]
    assert report.config is not None and report.config.max_train_steps == 30
    assert report.config.loraflow.preview_prompts == list(PREVIEW_PROMPTS)
    assert report.config.network_args.conv_dim == 16


def test_given_sample_pictures_when_read_back_then_each_shows_its_scene_and_caption_names_it(
    tmp_path: Path,
) -> None:
    dataset = write_sample_dataset(tmp_path)

    for folder in FOLDERS:
        pictures = sorted((dataset / folder.folder).glob(f"*.{folder.extension}"))
        assert len(pictures) == len(folder.scenes)
        for picture, scene in zip(pictures, folder.scenes, strict=True):
            reading = read(Image.open(picture))
            fields = ("colour", "shape", "position", "size", "background")
            assert reading.agrees(scene, *fields), (picture, reading)
            caption = picture.with_suffix(".txt")
            if folder.trained and picture.stem == "img00":  # left to the folder's trigger (kohya's fallback)
                assert not caption.exists()
            else:
                assert caption.read_text(encoding="utf-8") == folder.caption(scene)
                assert (TRIGGER in caption.read_text(encoding="utf-8")) is folder.trained


def test_given_sample_dataset_when_written_twice_then_identical_bytes(tmp_path: Path) -> None:
    first = write_sample_dataset(tmp_path / "a")
    second = write_sample_dataset(tmp_path / "b")

    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
