import pytest
from loraflow_shared.dataset.layout import (
    FileKind,
    Subset,
    check_key_safe,
    classify,
    dataset_id,
    default_preview_prompts,
    group_files,
    parse_subset_folder,
    relative_path,
)
from loraflow_shared.errors import ErrorCode, LoraflowError


@pytest.mark.parametrize(
    ("name", "repeats", "trigger", "class_name"),
    [
        ("60_dwjz", 60, "dwjz", None),
        ("20_zqxj dog", 20, "zqxj", "dog"),
        ("5_zqxj  big dog ", 5, "zqxj", "big dog"),
        ("1000_x", 1000, "x", None),
        ("007_agent", 7, "agent", None),
    ],
)
def test_given_kohya_folder_name_when_parsed_then_repeats_trigger_and_class(
    name: str, repeats: int, trigger: str, class_name: str | None
) -> None:
    subset = parse_subset_folder(name)

    assert (subset.folder, subset.repeats, subset.trigger, subset.class_name) == (
        name,
        repeats,
        trigger,
        class_name,
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("dwjz", "has no '_'"),
        ("x_dwjz", "'x' is not a whole number"),
        ("-5_dwjz", "'-5' is not a whole number"),
        ("0_dwjz", "repeat count 0"),
        ("1001_dwjz", "repeat count 1001"),
        ("10_", "no trigger word"),
        ("10_ dog", "no trigger word"),
        ("10_dwjz ", "no class name"),
    ],
)
def test_given_bad_folder_name_when_parsed_then_bad_folder_name_says_why_and_the_form(
    name: str, reason: str
) -> None:
    with pytest.raises(LoraflowError) as caught:
        parse_subset_folder(name)

    assert caught.value.code is ErrorCode.BAD_FOLDER_NAME
    assert caught.value.path == name
    assert reason in caught.value.message
    assert "<repeats>_<trigger>" in caught.value.message


def test_given_lower_repeat_limit_when_parsed_then_limit_applies() -> None:
    with pytest.raises(LoraflowError, match="between 1 and 50"):
        parse_subset_folder("60_dwjz", max_repeats=50)


def test_given_subset_with_class_when_default_caption_then_trigger_and_class() -> None:
    assert Subset(folder="20_zqxj dog", repeats=20, trigger="zqxj", class_name="dog").default_caption == (
        "zqxj dog"
    )
    assert Subset(folder="60_dwjz", repeats=60, trigger="dwjz").default_caption == "dwjz"


@pytest.mark.parametrize(
    "rel_path",
    [
        "../x.png",
        "60_a/../../x",
        "/abs.png",
        "60_a\\x.png",
        "60_a//x.png",
        "60_a/",
        "a\x00b",
        "a\nb",
        "./x",
        "",
    ],
)
def test_given_unsafe_key_when_checked_then_unsafe_key(rel_path: str) -> None:
    with pytest.raises(LoraflowError) as caught:
        check_key_safe(rel_path)

    assert caught.value.code is ErrorCode.UNSAFE_KEY


@pytest.mark.parametrize("rel_path", ["config.toml", "60_a/img 1.png", "20_zqxj dog/ünï.jpg", "a/b/c..d.png"])
def test_given_ordinary_key_when_checked_then_accepted(rel_path: str) -> None:
    check_key_safe(rel_path)  # raises on failure


def test_given_key_when_dataset_and_relative_path_taken_then_split_at_top_prefix() -> None:
    key = "my-set/60_dwjz/a.png"

    assert dataset_id(key) == "my-set"
    assert relative_path("my-set", key) == "60_dwjz/a.png"


@pytest.mark.parametrize("key", ["at-root.png", "/x/y.png"])
def test_given_key_outside_any_dataset_when_dataset_id_then_unsafe_key(key: str) -> None:
    with pytest.raises(LoraflowError) as caught:
        dataset_id(key)

    assert caught.value.code is ErrorCode.UNSAFE_KEY


def test_given_key_of_other_dataset_when_relative_path_then_unsafe_key() -> None:
    with pytest.raises(LoraflowError) as caught:
        relative_path("set-a", "set-ab/60_x/a.png")

    assert caught.value.code is ErrorCode.UNSAFE_KEY


@pytest.mark.parametrize(
    ("rel_path", "kind"),
    [
        ("kohya-sdxl-config.toml", FileKind.CONFIG),
        ("60_a/x.PNG", FileKind.IMAGE),
        ("60_a/x.jpeg", FileKind.IMAGE),
        ("60_a/x.webp", FileKind.IMAGE),
        ("60_a/x.txt", FileKind.CAPTION),
        ("60_a/x.caption", FileKind.CAPTION),
        ("60_a/sub/x.png", FileKind.UNEXPECTED),
        ("60_a/config.toml", FileKind.UNEXPECTED),
        ("x.png", FileKind.UNEXPECTED),
        ("README.md", FileKind.UNEXPECTED),
        (".DS_Store", FileKind.UNEXPECTED),
        ("60_a/.hidden.png", FileKind.UNEXPECTED),
        ("__MACOSX/60_a/._x.png", FileKind.UNEXPECTED),
        ("60_a/x.gif", FileKind.UNSUPPORTED_IMAGE),
        ("reg/1_dog/x.HEIC", FileKind.UNSUPPORTED_IMAGE),
        ("60_a/sub/x.tif", FileKind.UNEXPECTED),  # where no image is used, no format is wrong either
        ("x.bmp", FileKind.UNEXPECTED),
    ],
)
def test_given_relative_path_when_classified_then_kind(rel_path: str, kind: FileKind) -> None:
    assert classify(rel_path) is kind


def test_given_listing_when_grouped_then_captions_matched_by_stem_with_txt_first() -> None:
    files = group_files(
        [
            "c.toml",
            "60_a/1.png",
            "60_a/1.caption",
            "60_a/1.txt",
            "60_a/2.jpg",
            "60_a/2.caption",
            "60_a/3.txt",
            "20_b/",
            "60_a/deep/4.png",
            ".DS_Store",
        ]
    )

    folder = files.folders["60_a"]
    assert files.config_files == ["c.toml"]
    assert folder.images == ["60_a/1.png", "60_a/2.jpg"]
    assert folder.caption_for("60_a/1.png") == "60_a/1.txt"
    assert folder.caption_for("60_a/2.jpg") == "60_a/2.caption"
    assert folder.shadowed_captions == {"60_a/1.caption": "60_a/1.txt"}
    assert folder.orphan_captions == ["60_a/3.txt"]
    assert files.folders["20_b"].images == []
    assert files.unexpected == [".DS_Store", "60_a/deep/4.png"]
    assert files.image_count == 2
    assert files.used_captions == ["60_a/1.txt", "60_a/2.caption"]


def test_given_two_subsets_when_default_prompts_then_built_from_both_without_repeats_and_at_most_8() -> None:
    subsets = [
        parse_subset_folder("60_dwjz"),
        parse_subset_folder("20_zqxj dog"),
        parse_subset_folder("5_dwjz"),
    ]

    prompts = default_preview_prompts(subsets)

    assert 3 <= len(prompts) <= 8
    assert len(set(prompts)) == len(prompts)
    assert any("zqxj dog" in prompt for prompt in prompts)
    assert any("dwjz" in prompt for prompt in prompts)


def test_given_many_subsets_when_default_prompts_then_capped_at_8() -> None:
    subsets = [parse_subset_folder(f"1_trigger{index}") for index in range(5)]

    assert len(default_preview_prompts(subsets)) == 8
