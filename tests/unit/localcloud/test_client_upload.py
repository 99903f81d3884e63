"""`loraflow train`'s upload: only what S3 lacks, stale objects removed, one byte progress bar (moto S3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from loraflow_local.sample_dataset import write_sample_dataset
from loraflow_local.uploader import upload_dataset

BUCKET = "datasets"


class Bar:
    """Records what the uploader reports, as tqdm would show it."""

    def __init__(self, total: int, **_: Any) -> None:
        self.total, self.n = total, 0

    def update(self, amount: int) -> None:
        self.n += amount

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *_: object) -> None:
        bars.append(self)


bars: list[Bar] = []


@pytest.fixture
def s3(aws: None) -> Any:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    bars.clear()
    return client


def _keys(s3: Any) -> list[str]:
    return sorted(item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_given_new_dataset_when_uploaded_then_every_file_under_the_name_with_bytes_reported(
    s3: Any, tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path)
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    result = upload_dataset(s3, folder, BUCKET, "mine", progress=Bar)

    assert _keys(s3) == sorted(f"mine/{p.relative_to(folder).as_posix()}" for p in files)
    assert result.skipped == [] and result.deleted == []
    assert bars[0].total == bars[0].n == result.uploaded_bytes == sum(p.stat().st_size for p in files)
    body = s3.get_object(Bucket=BUCKET, Key="mine/10_dwjz/img00.png")["Body"].read()
    assert body == (folder / "10_dwjz" / "img00.png").read_bytes()


def test_given_interrupted_upload_when_run_again_then_only_missing_and_changed_files_go_up(
    s3: Any, tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path)
    upload_dataset(s3, folder, BUCKET, "mine", progress=Bar)
    s3.delete_object(Bucket=BUCKET, Key="mine/10_dwjz/img03.png")  # never arrived
    (folder / "10_dwjz" / "img01.txt").write_text("a red dwjz", encoding="utf-8")  # changed

    result = upload_dataset(s3, folder, BUCKET, "mine", progress=Bar)

    assert sorted(result.uploaded) == ["mine/10_dwjz/img01.txt", "mine/10_dwjz/img03.png"]
    assert len(result.skipped) == len([p for p in folder.rglob("*") if p.is_file()]) - 2
    assert bars[-1].n == result.uploaded_bytes


def test_given_file_removed_from_folder_when_uploaded_then_removed_from_the_dataset_too(
    s3: Any, tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path)
    upload_dataset(s3, folder, BUCKET, "mine", progress=Bar)
    s3.put_object(Bucket=BUCKET, Key="other/kept.png", Body=b"x")  # another dataset: untouched
    (folder / "10_dwjz" / "img04.png").unlink()
    (folder / "10_dwjz" / "img01.txt").unlink()

    result = upload_dataset(s3, folder, BUCKET, "mine", progress=Bar)

    assert result.uploaded == [] and result.deleted == ["mine/10_dwjz/img01.txt", "mine/10_dwjz/img04.png"]
    assert "mine/10_dwjz/img04.png" not in _keys(s3) and "other/kept.png" in _keys(s3)
