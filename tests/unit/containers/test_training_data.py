"""The trainer's dataset: buckets, pixels, captions, epoch composition (repeats, reg balance), batches."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_training.data import TrainingData, balanced_reg_repeats, load_training_data
from PIL import Image

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

# resolution 96 (area 9216), steps 32, 64..160: three buckets, 64x128, 96x96 and 128x64.
BUCKETED = TrainingConfig(
    resolution=(96, 96), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=160, bucket_reso_steps=32
)
PLAIN_64 = TrainingConfig(resolution=(64, 64))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_images(folder: Path, sizes: list[tuple[int, int]], prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, (width, height) in enumerate(sizes):
        name = f"{prefix}{index}.png"
        noise(width, height, seed=index).save(folder / name)
        names.append(name)
    return names


def load(root: Path, config: TrainingConfig = PLAIN_64) -> TrainingData:
    return load_training_data(root, config)


def sample_index(data: TrainingData, rel_path: str) -> int:
    return next(index for index, sample in enumerate(data.samples) if sample.rel_path == rel_path)


# --- buckets and pixels


def test_given_mixed_aspect_images_when_bucketed_then_each_in_its_nearest_bucket(tmp_path: Path) -> None:
    write_images(tmp_path / "1_ohwx", [(80, 150), (150, 80), (100, 100), (70, 140)])

    data = load(tmp_path, BUCKETED)

    buckets = {sample.rel_path: sample.bucket for sample in data.samples}
    assert buckets == {
        "1_ohwx/img0.png": (64, 128),
        "1_ohwx/img1.png": (128, 64),
        "1_ohwx/img2.png": (96, 96),
        "1_ohwx/img3.png": (64, 128),
    }
    assert data.bucket_counts == {"64x128": 2, "96x96": 1, "128x64": 1}


def test_given_bucketed_sample_when_pixels_then_uint8_at_its_bucket_size(tmp_path: Path) -> None:
    write_images(tmp_path / "1_ohwx", [(80, 150), (150, 80)])
    data = load(tmp_path, BUCKETED)

    shapes = [tuple(data.pixels(index).shape) for index in range(len(data.samples))]

    assert shapes == [(3, 128, 64), (3, 64, 128)]
    assert data.pixels(0).dtype == torch.uint8


def test_given_bucketing_off_when_pixels_then_resized_to_cover_and_centre_cropped(tmp_path: Path) -> None:
    # 96x64: red | green | blue columns of 16, 64 and 16 px; covering 64x64 keeps the size, crops the sides
    stripes = np.zeros((64, 96, 3), dtype=np.uint8)
    stripes[:, :16, 0], stripes[:, 16:80, 1], stripes[:, 80:, 2] = 255, 255, 255
    (tmp_path / "1_ohwx").mkdir()
    Image.fromarray(stripes, "RGB").save(tmp_path / "1_ohwx" / "a.png")

    pixels = load(tmp_path).pixels(0)

    assert tuple(pixels.shape) == (3, 64, 64)
    assert torch.equal(pixels[1], torch.full((64, 64), 255, dtype=torch.uint8))
    assert int(pixels[0].max()) == 0 and int(pixels[2].max()) == 0


def test_given_flip_when_pixels_then_mirrored_left_right(tmp_path: Path) -> None:
    write_images(tmp_path / "1_ohwx", [(150, 80)])
    data = load(tmp_path, BUCKETED)

    plain, flipped = data.pixels(0), data.pixels(0, flip=True)

    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain.flip(-1))


def test_given_exif_rotated_jpeg_when_loaded_then_bucketed_and_decoded_upright(tmp_path: Path) -> None:
    (tmp_path / "1_ohwx").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: a portrait
    noise(150, 80).save(tmp_path / "1_ohwx" / "a.jpg", exif=exif, quality=95)

    data = load(tmp_path, BUCKETED)

    assert data.samples[0].bucket == (64, 128)
    assert tuple(data.pixels(0).shape) == (3, 128, 64)


def broken_bytes(kind: str) -> bytes:
    if kind == "garbage":
        return b"this is not a picture" * 10
    image_format = "JPEG" if kind == "truncated-jpeg" else "PNG"
    buffer = io.BytesIO()
    noise(512, 512).save(buffer, image_format)  # 512 px: a JPEG decodes at 1/8 scale for a 64 px bucket
    return buffer.getvalue()[: buffer.tell() // 2]


def test_given_large_jpeg_when_pixels_then_reduced_decode_matches_a_full_decode(tmp_path: Path) -> None:
    ys, xs = np.mgrid[0:384, 0:512]
    gradient = np.stack([xs / 2, ys / 1.5, (xs + ys) / 3.5], axis=-1).astype(np.uint8)
    (tmp_path / "1_ohwx").mkdir()
    Image.fromarray(gradient, "RGB").save(tmp_path / "1_ohwx" / "a.jpg", quality=95)

    pixels = load(tmp_path).pixels(0)

    full = Image.open(tmp_path / "1_ohwx" / "a.jpg").convert("RGB").resize((85, 64), Image.Resampling.LANCZOS)
    expected = torch.from_numpy(np.array(full.crop((10, 0, 74, 64)))).permute(2, 0, 1)
    assert tuple(pixels.shape) == (3, 64, 64)
    assert (pixels.float() - expected.float()).abs().mean() < 2.0


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("truncated.png", "truncated-png"),
        ("truncated.jpg", "truncated-jpeg"),
        ("not-an-image.png", "garbage"),
    ],
)
def test_given_undecodable_image_when_loaded_then_unreadable_image_with_its_path(
    tmp_path: Path, name: str, kind: str
) -> None:
    write_images(tmp_path / "1_ohwx", [(64, 64)])
    (tmp_path / "1_ohwx" / name).write_bytes(broken_bytes(kind))

    with pytest.raises(LoraflowError) as caught:
        load(tmp_path)

    assert caught.value.code is ErrorCode.UNREADABLE_IMAGE
    assert caught.value.path == f"1_ohwx/{name}"


# --- captions


def test_given_caption_sources_when_loaded_then_file_metadata_or_folder_name(tmp_path: Path) -> None:
    write_images(tmp_path / "2_ohwx man", [(64, 64), (64, 64), (64, 64)])
    (tmp_path / "2_ohwx man" / "img0.txt").write_text("ohwx man, smiling\n", encoding="utf-8")
    (tmp_path / "2_ohwx man" / "img1.caption").write_text("ohwx man, in a hat", encoding="utf-8")
    write_images(tmp_path / "1_sks dog", [(64, 64), (64, 64)])
    metadata = [{"file_name": "img0.png", "text": "sks dog on grass"}]
    (tmp_path / "1_sks dog" / "metadata.jsonl").write_text(json.dumps(metadata[0]) + "\n", encoding="utf-8")
    (tmp_path / "1_sks dog" / "img1.txt").write_text("shadowed by metadata.jsonl", encoding="utf-8")
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)])

    captions = {sample.rel_path: sample.caption for sample in load(tmp_path).samples}

    assert captions == {
        "2_ohwx man/img0.png": "ohwx man, smiling",
        "2_ohwx man/img1.png": "ohwx man, in a hat",
        "2_ohwx man/img2.png": "ohwx man",
        "1_sks dog/img0.png": "sks dog on grass",
        "1_sks dog/img1.png": "sks dog",
        "reg/1_dog/img0.png": "dog",
    }


def test_given_bad_metadata_line_when_loaded_then_bad_caption_names_file_and_line(tmp_path: Path) -> None:
    write_images(tmp_path / "1_sks", [(64, 64)])
    (tmp_path / "1_sks" / "metadata.jsonl").write_text('{"file_name": "img0.png"}\n', encoding="utf-8")

    with pytest.raises(LoraflowError) as caught:
        load(tmp_path)

    assert caught.value.code is ErrorCode.BAD_CAPTION
    assert caught.value.path == "1_sks/metadata.jsonl"
    assert "line 1" in caught.value.message


def test_given_shuffle_and_keep_tokens_when_captioned_then_kept_token_first_and_seeded(
    tmp_path: Path,
) -> None:
    write_images(tmp_path / "1_ohwx", [(64, 64)])
    (tmp_path / "1_ohwx" / "img0.txt").write_text("ohwx, red, green, blue, sky", encoding="utf-8")
    config = PLAIN_64.model_copy(update={"shuffle_caption": True, "keep_tokens": 1})
    data = load(tmp_path, config)

    first_rng, again_rng = random.Random(5), random.Random(5)
    first = [data.caption(0, first_rng) for _ in range(8)]
    again = [data.caption(0, again_rng) for _ in range(8)]

    assert data.captions_vary
    assert first == again
    assert len(set(first)) > 1
    assert all(caption.startswith("ohwx, ") for caption in first)


def test_given_no_caption_rules_when_captioned_then_fixed_and_cacheable(tmp_path: Path) -> None:
    write_images(tmp_path / "1_ohwx", [(64, 64)])
    data = load(tmp_path)

    assert not data.captions_vary
    assert data.caption(0, random.Random(0)) == data.samples[0].caption == "ohwx"


def test_given_dropout_when_captioned_then_empty_at_about_the_rate(tmp_path: Path) -> None:
    write_images(tmp_path / "1_ohwx", [(64, 64)])
    data = load(tmp_path, PLAIN_64.model_copy(update={"caption_dropout_rate": 0.25}))
    rng = random.Random(2)

    dropped = sum(data.caption(0, rng) == "" for _ in range(2000))

    assert data.captions_vary
    assert abs(dropped / 2000 - 0.25) < 0.04  # binomial sigma ~0.01


# --- epoch composition


@pytest.mark.parametrize(
    ("reg_repeats", "train_samples", "expected"),
    [
        ([1, 1, 1], 7, [3, 2, 2]),  # cycled one more repeat at a time until 7
        ([1, 1, 1, 1, 1], 3, [1, 1, 1, 0, 0]),  # more reg images than train samples: the rest unused
        ([2, 2], 3, [2, 2]),  # kohya's first pass takes whole folder repeats: may overshoot
        ([1, 1], 4, [2, 2]),
        ([2, 1], 7, [4, 3]),  # after the first pass, one repeat at a time whatever the folder says
        ([], 5, []),
    ],
)
def test_given_reg_images_when_balanced_then_kohyas_reg_samples_per_epoch(
    reg_repeats: list[int], train_samples: int, expected: list[int]
) -> None:
    assert balanced_reg_repeats(reg_repeats, train_samples) == expected


def test_given_repeats_and_reg_when_epoch_then_train_repeated_and_reg_matching(tmp_path: Path) -> None:
    write_images(tmp_path / "3_ohwx", [(64, 64), (64, 64)])
    write_images(tmp_path / "2_sks dog", [(64, 64), (64, 64), (64, 64)])
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)] * 4)

    data = load(tmp_path)
    counts = Counter(data.epoch_indices())

    by_subset: Counter[str] = Counter()
    for index, count in counts.items():
        by_subset[data.samples[index].subset] += count
    assert by_subset == {"3_ohwx": 6, "2_sks dog": 6, "reg/1_dog": 12}
    assert {counts[index] for index, sample in enumerate(data.samples) if sample.is_reg} == {3}
    assert [sample.is_reg for sample in data.samples] == [False] * 5 + [True] * 4
    assert data.repeats_by_subset() == {"2_sks dog": 6, "3_ohwx": 6, "reg/1_dog": 12}


def test_given_more_reg_images_than_train_samples_when_loaded_then_extra_reg_left_out(tmp_path: Path) -> None:
    write_images(tmp_path / "2_ohwx", [(64, 64)])
    write_images(tmp_path / "reg" / "1_person", [(64, 64)] * 5)

    data = load(tmp_path)

    assert [sample.rel_path for sample in data.samples] == [
        "2_ohwx/img0.png",
        "reg/1_person/img0.png",
        "reg/1_person/img1.png",
    ]
    assert sorted(data.epoch_indices()) == [0, 0, 1, 2]


def test_given_only_reg_images_when_loaded_then_no_asset_folder(tmp_path: Path) -> None:
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)])

    with pytest.raises(LoraflowError) as caught:
        load(tmp_path)

    assert caught.value.code is ErrorCode.NO_ASSET_FOLDER


# --- batches


def bucketed_dataset(root: Path) -> TrainingData:
    write_images(root / "3_ohwx", [(80, 150), (150, 80), (100, 100), (70, 140), (160, 90)])
    write_images(root / "reg" / "1_person", [(100, 100), (90, 170), (64, 64)])
    return load(root, BUCKETED)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_given_buckets_when_batched_then_no_batch_mixes_buckets_and_each_epoch_is_whole(
    tmp_path: Path, batch_size: int
) -> None:
    data = bucketed_dataset(tmp_path)
    batches = data.batches(batch_size, torch.Generator().manual_seed(0))
    per_epoch = data.batches_per_epoch(batch_size)

    for _ in range(3):
        epoch = [next(batches) for _ in range(per_epoch)]
        assert sorted(index for batch in epoch for index in batch) == sorted(data.epoch_indices())
        for batch in epoch:
            assert 1 <= len(batch) <= batch_size
            assert len({data.samples[index].bucket for index in batch}) == 1


def test_given_same_seed_when_batched_then_same_order_and_epochs_reshuffled(tmp_path: Path) -> None:
    data = bucketed_dataset(tmp_path)
    per_epoch = data.batches_per_epoch(2)

    def first_batches(seed: int) -> list[list[int]]:
        batches = data.batches(2, torch.Generator().manual_seed(seed))
        return [next(batches) for _ in range(2 * per_epoch)]

    run = first_batches(3)
    assert run == first_batches(3)
    assert run[:per_epoch] != run[per_epoch:]
    assert run != first_batches(4)
