"""Regularization (``reg/<repeats>_<class>``) and imagefolder (``metadata.jsonl``) subsets in the layout."""

import pytest
from loraflow_shared.dataset.layout import (
    CaptionSource,
    FileKind,
    classify,
    default_preview_prompts,
    group_files,
    parse_subset_folder,
    subset_folder_of,
)
from loraflow_shared.errors import ErrorCode, LoraflowError


@pytest.mark.parametrize(
    ("rel_path", "kind"),
    [
        ("reg/1_dog/a.png", FileKind.IMAGE),
        ("reg/1_dog/a.txt", FileKind.CAPTION),
        ("reg/1_dog/metadata.jsonl", FileKind.METADATA),
        ("60_a/metadata.jsonl", FileKind.METADATA),
        ("60_a/metadata.csv", FileKind.UNEXPECTED),
        ("metadata.jsonl", FileKind.UNEXPECTED),
        ("reg/a.png", FileKind.UNEXPECTED),
        ("reg/1_dog/deep/a.png", FileKind.UNEXPECTED),
        ("reg/.hidden/a.png", FileKind.UNEXPECTED),
        ("60_a/deep/metadata.jsonl", FileKind.UNEXPECTED),
    ],
)
def test_given_subset_paths_when_classified_then_kind(rel_path: str, kind: FileKind) -> None:
    assert classify(rel_path) is kind


@pytest.mark.parametrize(
    ("rel_path", "folder"),
    [
        ("60_a/x.png", "60_a"),
        ("reg/1_dog/x.png", "reg/1_dog"),
        ("reg/1_dog/", "reg/1_dog"),
        ("reg/x.png", None),
        ("reg/", None),
        ("reg/.git/x", None),
        ("x.toml", None),
    ],
)
def test_given_path_when_subset_folder_asked_then_reg_folders_are_two_levels(
    rel_path: str, folder: str | None
) -> None:
    assert subset_folder_of(rel_path) == folder


def test_given_reg_folder_when_parsed_then_reg_subset_keeps_its_path() -> None:
    subset = parse_subset_folder("reg/1_dog")

    assert (subset.folder, subset.repeats, subset.trigger, subset.is_reg) == ("reg/1_dog", 1, "dog", True)
    assert subset.default_caption == "dog"


def test_given_multi_word_reg_folder_when_parsed_then_caption_is_every_word() -> None:
    assert parse_subset_folder("reg/2_photo of a dog").default_caption == "photo of a dog"


def test_given_bad_reg_folder_name_when_parsed_then_bad_folder_name_with_reg_form() -> None:
    with pytest.raises(LoraflowError) as caught:
        parse_subset_folder("reg/dogs")

    assert (caught.value.code, caught.value.path) == (ErrorCode.BAD_FOLDER_NAME, "reg/dogs")
    assert "reg/<repeats>_<class>" in caught.value.message


def test_given_train_folder_when_parsed_then_not_reg() -> None:
    assert parse_subset_folder("60_dwjz").is_reg is False


def test_given_reg_subsets_when_grouped_then_marked_reg_and_counted_apart() -> None:
    files = group_files(
        ["c.toml", "60_a/1.png", "60_a/2.png", "reg/1_dog/r1.png", "reg/1_dog/r1.txt", "reg/1_dog/r2.jpg"]
    )

    assert [(f.folder, f.is_reg) for f in files.folders.values()] == [("60_a", False), ("reg/1_dog", True)]
    assert [f.folder for f in files.train_folders] == ["60_a"]
    assert [f.folder for f in files.reg_folders] == ["reg/1_dog"]
    assert (files.train_image_count, files.reg_image_count, files.image_count) == (2, 2, 4)
    assert files.folders["reg/1_dog"].caption_for("reg/1_dog/r1.png") == "reg/1_dog/r1.txt"
    assert files.used_captions == ["reg/1_dog/r1.txt"]


def test_given_same_folder_name_in_train_and_reg_when_grouped_then_two_subsets() -> None:
    files = group_files(["1_dog/a.png", "reg/1_dog/b.png"])

    assert files.folders["1_dog"].images == ["1_dog/a.png"]
    assert files.folders["reg/1_dog"].images == ["reg/1_dog/b.png"]


def test_given_files_directly_in_reg_when_grouped_then_unexpected_and_no_folder() -> None:
    files = group_files(["reg/", "reg/x.png", "reg/1_dog/deep/y.png"])

    assert files.unexpected == ["reg/1_dog/deep/y.png", "reg/x.png"]
    assert list(files.folders) == ["reg/1_dog"]


def test_given_metadata_folder_when_grouped_then_metadata_wins_over_caption_files() -> None:
    files = group_files(["60_a/metadata.jsonl", "60_a/1.png", "60_a/1.txt", "60_a/2.png", "60_a/9.caption"])

    folder = files.folders["60_a"]
    assert folder.metadata_file == "60_a/metadata.jsonl"
    assert folder.captions == {}
    assert folder.orphan_captions == []
    assert folder.shadowed_captions == {
        "60_a/1.txt": "60_a/metadata.jsonl",
        "60_a/9.caption": "60_a/metadata.jsonl",
    }
    assert files.used_captions == []


def test_given_each_kind_of_folder_when_caption_source_asked_then_where_the_caption_comes_from() -> None:
    files = group_files(["60_a/metadata.jsonl", "60_a/1.png", "20_b/1.png", "20_b/1.txt", "20_b/2.png"])

    assert files.folders["60_a"].caption_source("60_a/1.png") == CaptionSource(
        kind="metadata", path="60_a/metadata.jsonl"
    )
    assert files.folders["20_b"].caption_source("20_b/1.png") == CaptionSource(kind="file", path="20_b/1.txt")
    assert files.folders["20_b"].caption_source("20_b/2.png") == CaptionSource(kind="folder_name")


def test_given_reg_subsets_when_preview_prompts_built_then_only_training_subsets_are_used() -> None:
    subsets = [parse_subset_folder("60_dwjz"), parse_subset_folder("reg/1_dog")]

    prompts = default_preview_prompts(subsets)

    assert prompts[0] == "a photo of dwjz"
    assert not any("dog" in prompt for prompt in prompts)
