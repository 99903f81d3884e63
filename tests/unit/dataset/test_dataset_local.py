import hashlib
from pathlib import Path

import pytest
from imagegen import image_bytes
from loraflow_shared.dataset.local import list_local_objects, local_directory_reader
from loraflow_shared.dataset.validate import validate_dataset
from loraflow_shared.errors import ErrorCode


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel_path, data in files.items():
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_given_local_dataset_folder_when_listed_then_keys_sizes_and_md5_etags_like_s3(tmp_path: Path) -> None:
    write_files(tmp_path, {"dogs/config.toml": b"seed = 1\n", "dogs/60_dwjz/a.txt": b"dwjz"})

    objects = list_local_objects(tmp_path, "dogs")

    assert [(o.key, o.size) for o in objects] == [("dogs/60_dwjz/a.txt", 4), ("dogs/config.toml", 9)]
    assert objects[0].etag == hashlib.md5(b"dwjz").hexdigest()  # S3's single-part ETag
    assert objects[0].last_modified.tzinfo is not None


def test_given_local_dataset_when_validated_then_same_rules_as_s3(tmp_path: Path) -> None:
    png = image_bytes("PNG", 96, 96)
    write_files(
        tmp_path,
        {
            "dogs/config.toml": b"network_dim = 4\n",
            "dogs/60_dwjz/a.png": png,
            "dogs/60_dwjz/b.png": png[:-30],
            "dogs/60_dwjz/.DS_Store": b"\x00",
        },
    )

    report = validate_dataset("dogs", list_local_objects(tmp_path, "dogs"), local_directory_reader(tmp_path))

    assert [(p.code, p.path) for p in report.errors] == [(ErrorCode.UNREADABLE_IMAGE, "60_dwjz/b.png")]
    assert [(p.code, p.path) for p in report.warnings] == [(ErrorCode.UNEXPECTED_FILE, "60_dwjz/.DS_Store")]
    assert report.config is not None and report.config.network_dim == 4


def test_given_local_reader_when_range_read_then_inclusive_range_clipped_at_the_end(tmp_path: Path) -> None:
    write_files(tmp_path, {"ds/x.bin": bytes(range(10))})
    reader = local_directory_reader(tmp_path)

    assert reader.read_range("ds/x.bin", 2, 4) == bytes([2, 3, 4])
    assert reader.read_range("ds/x.bin", 8, 100) == bytes([8, 9])
    assert reader.read_all("ds/x.bin") == bytes(range(10))


def test_given_key_escaping_the_root_when_read_locally_then_refused(tmp_path: Path) -> None:
    write_files(tmp_path, {"root/ds/x.bin": b"x", "secret.txt": b"s"})
    reader = local_directory_reader(tmp_path / "root")

    with pytest.raises(ValueError, match="outside"):
        reader.read_all("ds/../../secret.txt")


def test_given_missing_dataset_folder_when_listed_then_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_local_objects(tmp_path, "nope")
