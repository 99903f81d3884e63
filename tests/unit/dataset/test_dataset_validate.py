import pytest
from dataset_memory import MemoryBucket
from imagegen import image_bytes, jpeg_with_big_icc, png_with_declared_size
from loraflow_shared.dataset.images import HEAD_BYTES, TAIL_BYTES
from loraflow_shared.dataset.validate import ValidationLimits, ValidationReport, validate_dataset
from loraflow_shared.errors import ErrorCode

DATASET = "dogs"
CONFIG = b'[training_arguments]\nnetwork_dim = 8\nresolution = "512"\n'
PNG = image_bytes("PNG", 96, 96, seed=1)
JPEG = image_bytes("JPEG", 96, 80, seed=2)


def bucket_of(files: dict[str, bytes]) -> MemoryBucket:
    return MemoryBucket({f"{DATASET}/{path}": data for path, data in files.items()})


def valid_files(**extra: bytes) -> dict[str, bytes]:
    return {"config.toml": CONFIG, "60_dwjz/a.png": PNG, "60_dwjz/a.txt": b"dwjz, a dog", **extra}


def validate(files: dict[str, bytes], limits: ValidationLimits | None = None) -> ValidationReport:
    bucket = bucket_of(files)
    return validate_dataset(DATASET, bucket.listing(), bucket, limits or ValidationLimits())


def codes(problems: list) -> list[tuple[ErrorCode, str]]:
    return [(problem.code, problem.path) for problem in problems]


def test_given_valid_dataset_when_validated_then_accepted_with_config_and_summary() -> None:
    report = validate(valid_files(**{"20_zqxj dog/b.jpg": JPEG}))

    assert report.accepted, report.errors
    assert report.warnings == []
    assert report.config_file == "config.toml"
    assert report.config is not None and report.config.network_dim == 8
    assert report.image_count == 2
    assert [
        (s.folder, s.repeats, s.trigger, s.class_name, s.image_count, s.caption_count) for s in report.subsets
    ] == [
        ("20_zqxj dog", 20, "zqxj", "dog", 1, 0),
        ("60_dwjz", 60, "dwjz", None, 1, 1),
    ]


def test_given_no_config_when_validated_then_invalid_config_for_the_dataset() -> None:
    files = valid_files()
    del files["config.toml"]

    report = validate(files)

    assert codes(report.errors) == [(ErrorCode.INVALID_CONFIG, "")]
    assert "no .toml config" in report.errors[0].message
    assert report.config is None


def test_given_two_configs_when_validated_then_invalid_config_names_both() -> None:
    report = validate(valid_files(**{"other.toml": CONFIG}))

    assert codes(report.errors) == [(ErrorCode.INVALID_CONFIG, "")]
    assert "config.toml" in report.errors[0].message and "other.toml" in report.errors[0].message


def test_given_bad_config_values_when_validated_then_each_reported_at_the_config_path() -> None:
    report = validate(valid_files(**{"config.toml": b"network_dim = 0\nseed = -1\n"}))

    assert codes(report.errors) == [(ErrorCode.INVALID_CONFIG, "config.toml")] * 2


def test_given_oversized_config_when_validated_then_invalid_config_without_reading_it() -> None:
    files = valid_files(**{"config.toml": b"# padding\n" * 10_000})
    bucket = bucket_of(files)

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert codes(report.errors) == [(ErrorCode.INVALID_CONFIG, "config.toml")]
    assert f"{DATASET}/config.toml" not in bucket.full_reads


def test_given_images_at_the_root_only_when_validated_then_no_asset_folder() -> None:
    report = validate({"config.toml": CONFIG, "a.png": PNG})

    assert codes(report.errors) == [(ErrorCode.NO_ASSET_FOLDER, "")]
    assert codes(report.warnings) == [(ErrorCode.UNEXPECTED_FILE, "a.png")]
    assert "folder" in report.warnings[0].message


def test_given_bad_folder_name_when_validated_then_bad_folder_name_at_the_folder() -> None:
    report = validate(valid_files(**{"dwjz/b.png": PNG}))

    assert codes(report.errors) == [(ErrorCode.BAD_FOLDER_NAME, "dwjz")]
    assert [subset.folder for subset in report.subsets] == ["60_dwjz"]


def test_given_subset_without_images_when_validated_then_too_few_images_at_the_folder() -> None:
    report = validate(valid_files(**{"10_cat/x.txt": b"a cat"}))

    assert (ErrorCode.TOO_FEW_IMAGES, "10_cat") in codes(report.errors)
    assert (ErrorCode.ORPHAN_CAPTION, "10_cat/x.txt") in codes(report.warnings)


def test_given_empty_folder_marker_when_validated_then_too_few_images_for_that_folder() -> None:
    bucket = bucket_of(valid_files(**{"10_cat/": b""}))

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert codes(report.errors) == [(ErrorCode.TOO_FEW_IMAGES, "10_cat")]


def test_given_fewer_images_than_the_minimum_when_validated_then_too_few_images_for_the_dataset() -> None:
    report = validate(valid_files(), ValidationLimits(min_images=3))

    assert codes(report.errors) == [(ErrorCode.TOO_FEW_IMAGES, "")]
    assert "1 images, at least 3" in report.errors[0].message


def test_given_more_images_than_the_maximum_when_validated_then_too_many_images_and_no_image_reads() -> None:
    files = valid_files(**{f"60_dwjz/{index}.png": PNG for index in range(3)})
    bucket = bucket_of(files)

    report = validate_dataset(DATASET, bucket.listing(), bucket, ValidationLimits(max_images=2))

    assert codes(report.errors) == [(ErrorCode.TOO_MANY_IMAGES, "")]
    assert bucket.ranges == []


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (image_bytes("GIF", 96, 96), ErrorCode.UNSUPPORTED_FORMAT),
        (b"", ErrorCode.UNSUPPORTED_FORMAT),
        (PNG[:-20], ErrorCode.UNREADABLE_IMAGE),
        (image_bytes("PNG", 48, 96), ErrorCode.IMAGE_TOO_SMALL),
        (png_with_declared_size(50_000, 50_000), ErrorCode.IMAGE_TOO_LARGE),
    ],
)
def test_given_bad_image_when_validated_then_rejected_with_its_code(data: bytes, code: ErrorCode) -> None:
    report = validate(valid_files(**{"60_dwjz/bad.png": data}))

    assert codes(report.errors) == [(code, "60_dwjz/bad.png")]
    assert not report.accepted


def test_given_file_over_the_size_limit_when_validated_then_file_too_large_without_reading_it() -> None:
    bucket = bucket_of(valid_files(**{"60_dwjz/big.png": PNG}))
    limits = ValidationLimits(max_file_bytes=len(PNG) - 1)

    report = validate_dataset(DATASET, bucket.listing(), bucket, limits)

    assert (ErrorCode.FILE_TOO_LARGE, "60_dwjz/big.png") in codes(report.errors)
    assert all(key != f"{DATASET}/60_dwjz/big.png" for key, _, _ in bucket.ranges)


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (b"   \n\t", "empty"),
        (b"", "empty"),
        (b"x" * 5000, "5000 bytes"),
    ],
)
def test_given_bad_caption_when_validated_then_bad_caption(caption: bytes, reason: str) -> None:
    report = validate(valid_files(**{"60_dwjz/a.txt": caption}))

    assert codes(report.errors) == [(ErrorCode.BAD_CAPTION, "60_dwjz/a.txt")]
    assert reason in report.errors[0].message


@pytest.mark.parametrize(
    "bad_path", ["60_dwjz/../../etc/passwd", "60_dwjz/a\x01.png", "60_dwjz\\b.png", "/x.png"]
)
def test_given_unsafe_key_when_validated_then_unsafe_key_and_nothing_read(bad_path: str) -> None:
    bucket = bucket_of(valid_files(**{bad_path: PNG}))

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert codes(report.errors) == [(ErrorCode.UNSAFE_KEY, bad_path)]
    assert all(key != f"{DATASET}/{bad_path}" for key, _, _ in bucket.ranges)


def test_given_key_outside_the_dataset_when_validated_then_unsafe_key() -> None:
    bucket = bucket_of(valid_files())
    bucket.objects["elsewhere/x.png"] = PNG

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert codes(report.errors) == [(ErrorCode.UNSAFE_KEY, "elsewhere/x.png")]


def test_given_stray_files_when_validated_then_unexpected_file_warnings_only() -> None:
    report = validate(
        valid_files(
            **{
                ".DS_Store": b"\x00",
                "60_dwjz/nested/c.png": PNG,
                "notes.md": b"hi",
                "60_dwjz/a.caption": b"x",
            }
        )
    )

    assert report.accepted
    assert codes(report.warnings) == [
        (ErrorCode.UNEXPECTED_FILE, ".DS_Store"),
        (ErrorCode.UNEXPECTED_FILE, "60_dwjz/a.caption"),
        (ErrorCode.UNEXPECTED_FILE, "60_dwjz/nested/c.png"),
        (ErrorCode.UNEXPECTED_FILE, "notes.md"),
    ]
    assert "60_dwjz/a.txt" in report.warnings[1].message


def test_given_orphan_caption_when_validated_then_orphan_caption_warning_and_not_read() -> None:
    bucket = bucket_of(valid_files(**{"60_dwjz/gone.txt": b"\xff not even utf-8"}))

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert report.accepted
    assert codes(report.warnings) == [(ErrorCode.ORPHAN_CAPTION, "60_dwjz/gone.txt")]
    assert f"{DATASET}/60_dwjz/gone.txt" not in bucket.full_reads


def test_given_same_image_twice_when_validated_then_duplicate_warning_names_the_other() -> None:
    report = validate(valid_files(**{"20_zqxj dog/copy.png": PNG}))

    assert codes(report.warnings) == [(ErrorCode.DUPLICATE_IMAGE, "60_dwjz/a.png")]
    assert "20_zqxj dog/copy.png" in report.warnings[0].message


def test_given_same_size_multipart_etags_when_validated_then_no_duplicate_warning() -> None:
    bucket = bucket_of(valid_files(**{"60_dwjz/b.png": PNG}))
    multipart = {key: "9b2cf535f27731c974343645a3985328-2" for key in bucket.objects}

    report = validate_dataset(DATASET, bucket.listing(etags=multipart), bucket)

    assert report.warnings == []


def test_given_jpeg_named_png_when_validated_then_extension_mismatch_warning() -> None:
    report = validate(valid_files(**{"60_dwjz/b.png": JPEG}))

    assert report.accepted
    assert codes(report.warnings) == [(ErrorCode.EXTENSION_MISMATCH, "60_dwjz/b.png")]
    assert "JPEG" in report.warnings[0].message


def test_given_ignored_config_keys_when_validated_then_warnings_and_keys_listed() -> None:
    report = validate(valid_files(**{"config.toml": b"xformers = true\n[[datasets]]\nresolution = 512\n"}))

    assert report.accepted
    assert report.ignored_keys == ["datasets", "xformers"]
    assert codes(report.warnings) == [(ErrorCode.IGNORED_CONFIG_KEY, "config.toml")] * 2


def test_given_many_problems_when_validated_then_all_collected_sorted_by_path_then_code() -> None:
    files = {
        "z.toml": b"network_dim = 0",
        "y.toml": CONFIG,
        "bad name/a.png": image_bytes("PNG", 32, 32),
        "60_dwjz/b.png": PNG[:-20],
        "60_dwjz/b.txt": b"",
        "5_empty/": b"",
    }

    report = validate(files)

    assert codes(report.errors) == [
        (ErrorCode.INVALID_CONFIG, ""),
        (ErrorCode.TOO_FEW_IMAGES, "5_empty"),
        (ErrorCode.UNREADABLE_IMAGE, "60_dwjz/b.png"),
        (ErrorCode.BAD_CAPTION, "60_dwjz/b.txt"),
        (ErrorCode.BAD_FOLDER_NAME, "bad name"),
        (ErrorCode.IMAGE_TOO_SMALL, "bad name/a.png"),
    ]


def test_given_large_images_when_validated_then_only_heads_and_tails_are_read() -> None:
    large = {
        "60_dwjz/a.png": image_bytes("PNG", 1024, 1024, seed=3),
        "60_dwjz/b.jpg": image_bytes("JPEG", 1024, 1024, seed=4, quality=95),
    }
    files = {"config.toml": CONFIG, **large}
    bucket = bucket_of(files)

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert report.accepted, report.errors
    assert sum(len(data) for data in large.values()) > 4 * (HEAD_BYTES + TAIL_BYTES)
    assert report.bytes_read == len(CONFIG) + len(large) * (HEAD_BYTES + TAIL_BYTES)


def test_given_jpeg_with_big_icc_profile_when_validated_then_reads_a_larger_head_and_accepts() -> None:
    data = jpeg_with_big_icc(300_000)
    bucket = bucket_of({"config.toml": CONFIG, "60_dwjz/a.jpg": data})

    report = validate_dataset(DATASET, bucket.listing(), bucket)

    assert report.accepted, report.errors
    head_reads = [end - start + 1 for key, start, end in bucket.ranges if start == 0]
    assert head_reads[0] == HEAD_BYTES and max(head_reads) > 300_000


def test_given_same_listing_when_validated_twice_then_same_report() -> None:
    files = valid_files(
        **{f"60_dwjz/{index}.jpg": image_bytes("JPEG", 96, 96, seed=index) for index in range(20)}
    )

    assert validate(files) == validate(files)
