"""Validation of regularization subsets (reg/<repeats>_<class>) and imagefolder metadata.jsonl subsets."""

import json

from dataset_memory import MemoryBucket
from imagegen import image_bytes
from loraflow_shared.dataset.validate import ValidationLimits, ValidationReport, validate_dataset
from loraflow_shared.errors import ErrorCode, Problem

DATASET = "dogs"
CONFIG = b"network_dim = 8\nprior_loss_weight = 0.5\n"
PNG = image_bytes("PNG", 96, 96, seed=1)
OTHER_PNG = image_bytes("PNG", 96, 96, seed=2)
METADATA = "60_dwjz/metadata.jsonl"


def validate(files: dict[str, bytes], limits: ValidationLimits | None = None) -> ValidationReport:
    bucket = MemoryBucket({f"{DATASET}/{path}": data for path, data in files.items()})
    return validate_dataset(DATASET, bucket.listing(), bucket, limits or ValidationLimits())


def jsonl(*entries: object) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in entries).encode()


def codes(problems: list[Problem]) -> list[tuple[ErrorCode, str]]:
    return [(problem.code, problem.path) for problem in problems]


def with_reg(**extra: bytes) -> dict[str, bytes]:
    files = {
        "config.toml": CONFIG,
        "60_dwjz/a.png": PNG,
        "reg/1_dog/r1.png": OTHER_PNG,
        "reg/1_dog/r1.txt": b"dog",
    }
    return {**files, **extra}


def test_given_reg_subset_when_validated_then_accepted_and_counted_apart_from_training() -> None:
    report = validate(with_reg(**{"reg/1_dog/r2.png": image_bytes("PNG", 96, 96, seed=3)}))

    assert report.accepted, report.errors
    assert report.warnings == []
    assert [(s.folder, s.is_reg) for s in report.subsets] == [("60_dwjz", False)]
    assert [(s.folder, s.repeats, s.class_name, s.trigger, s.is_reg) for s in report.reg_subsets] == [
        ("reg/1_dog", 1, None, "dog", True)
    ]
    assert (report.reg_subsets[0].image_count, report.reg_subsets[0].caption_count) == (2, 1)
    assert (report.train_image_count, report.reg_image_count, report.image_count) == (1, 2, 3)


def test_given_only_reg_subsets_when_validated_then_no_asset_folder() -> None:
    files = with_reg()
    del files["60_dwjz/a.png"]

    report = validate(files)

    assert codes(report.errors) == [(ErrorCode.NO_ASSET_FOLDER, "")]
    assert "regularization subsets alone train nothing" in report.errors[0].message


def test_given_bad_reg_folder_name_when_validated_then_bad_folder_name_with_its_path() -> None:
    report = validate(with_reg(**{"reg/dogs/x.png": image_bytes("PNG", 96, 96, seed=4)}))

    assert codes(report.errors) == [(ErrorCode.BAD_FOLDER_NAME, "reg/dogs")]


def test_given_broken_reg_image_and_caption_when_validated_then_same_rules_as_training() -> None:
    report = validate(with_reg(**{"reg/1_dog/r1.txt": b"", "reg/1_dog/bad.png": PNG[:200]}))

    assert codes(report.errors) == [
        (ErrorCode.UNREADABLE_IMAGE, "reg/1_dog/bad.png"),
        (ErrorCode.BAD_CAPTION, "reg/1_dog/r1.txt"),
    ]


def test_given_empty_reg_subset_when_validated_then_too_few_images_for_that_folder() -> None:
    report = validate(with_reg(**{"reg/2_cat/": b""}))

    assert codes(report.errors) == [(ErrorCode.TOO_FEW_IMAGES, "reg/2_cat")]


def test_given_files_directly_in_reg_when_validated_then_unexpected_file_with_hint() -> None:
    report = validate(with_reg(**{"reg/stray.png": OTHER_PNG}))

    assert report.accepted
    assert codes(report.warnings) == [(ErrorCode.UNEXPECTED_FILE, "reg/stray.png")]
    assert "reg/<repeats>_<class>" in report.warnings[0].message


def test_given_reg_images_over_the_limit_when_validated_then_too_many_images_says_how_many_are_reg() -> None:
    report = validate(with_reg(), ValidationLimits(max_images=1))

    assert codes(report.errors) == [(ErrorCode.TOO_MANY_IMAGES, "")]
    assert report.errors[0].message.startswith("2 images (1 of them in reg/), the limit is 1")


def test_given_reg_images_when_minimum_checked_then_only_training_images_count() -> None:
    report = validate(with_reg(), ValidationLimits(min_images=2))

    assert codes(report.errors) == [(ErrorCode.TOO_FEW_IMAGES, "")]
    assert report.errors[0].message == "1 images, at least 2 are needed (reg/ images do not count)"


def metadata_dataset(metadata: bytes, **extra: bytes) -> dict[str, bytes]:
    return {
        "config.toml": CONFIG,
        "60_dwjz/a.png": PNG,
        "60_dwjz/b.png": OTHER_PNG,
        METADATA: metadata,
        **extra,
    }


def test_given_imagefolder_subset_when_validated_then_accepted_with_metadata_captions_counted() -> None:
    report = validate(metadata_dataset(jsonl({"file_name": "a.png", "text": "dwjz, a dog on grass"})))

    assert report.accepted, report.errors
    assert report.warnings == []
    summary = report.subsets[0]
    assert (summary.folder, summary.metadata_file, summary.image_count, summary.caption_count) == (
        "60_dwjz",
        METADATA,
        2,
        1,
    )


def test_given_bad_metadata_lines_when_validated_then_bad_caption_per_line_on_the_metadata_path() -> None:
    metadata = jsonl({"file_name": "a.png", "text": ""}, {"file_name": "zzz.png", "text": "x"})

    report = validate(metadata_dataset(metadata))

    assert codes(report.errors) == [(ErrorCode.BAD_CAPTION, METADATA)] * 2
    assert [problem.message.split(":")[0] for problem in report.errors] == ["line 1", "line 2"]


def test_given_caption_files_beside_metadata_when_validated_then_unexpected_file_and_not_read() -> None:
    files = metadata_dataset(jsonl({"file_name": "a.png", "text": "dwjz"}), **{"60_dwjz/a.txt": b"\xff"})
    bucket = MemoryBucket({f"{DATASET}/{path}": data for path, data in files.items()})

    report = validate_dataset(DATASET, bucket.listing(), bucket, ValidationLimits())

    assert report.accepted, report.errors
    assert codes(report.warnings) == [(ErrorCode.UNEXPECTED_FILE, "60_dwjz/a.txt")]
    assert "come from metadata.jsonl" in report.warnings[0].message
    assert f"{DATASET}/60_dwjz/a.txt" not in bucket.full_reads


def test_given_oversized_metadata_when_validated_then_bad_caption_without_reading_it() -> None:
    files = metadata_dataset(jsonl({"file_name": "a.png", "text": "x" * 200}))
    bucket = MemoryBucket({f"{DATASET}/{path}": data for path, data in files.items()})

    report = validate_dataset(DATASET, bucket.listing(), bucket, ValidationLimits(max_metadata_bytes=100))

    assert codes(report.errors) == [(ErrorCode.BAD_CAPTION, METADATA)]
    assert "the limit is 100" in report.errors[0].message
    assert f"{DATASET}/{METADATA}" not in bucket.full_reads


def test_given_metadata_csv_when_validated_then_unexpected_file_says_only_jsonl_is_read() -> None:
    report = validate(
        metadata_dataset(jsonl({"file_name": "a.png", "text": "x"}), **{"60_dwjz/metadata.csv": b"a"})
    )

    assert codes(report.warnings) == [(ErrorCode.UNEXPECTED_FILE, "60_dwjz/metadata.csv")]
    assert "only metadata.jsonl" in report.warnings[0].message


def test_given_metadata_in_reg_subset_when_validated_then_same_rules_apply() -> None:
    report = validate(with_reg(**{"reg/1_dog/metadata.jsonl": b"{broken\n"}))

    assert codes(report.errors) == [(ErrorCode.BAD_CAPTION, "reg/1_dog/metadata.jsonl")]
    assert codes(report.warnings) == [(ErrorCode.UNEXPECTED_FILE, "reg/1_dog/r1.txt")]


def test_given_clip_skip_on_sdxl_config_when_validated_then_setting_adjusted_warning() -> None:
    report = validate(with_reg(**{"config.toml": b"sdxl = true\nclip_skip = 2\n"}))

    assert report.accepted
    assert codes(report.warnings) == [(ErrorCode.SETTING_ADJUSTED, "config.toml")]


def test_given_contradicting_config_keys_when_validated_then_rejected_before_training() -> None:
    report = validate(with_reg(**{"config.toml": b"enable_bucket = true\nresolution = 2048\n"}))

    assert codes(report.errors) == [(ErrorCode.INVALID_CONFIG, "config.toml")]
    assert report.errors[0].message.startswith("resolution: its longer side must be at most max_bucket_reso")
