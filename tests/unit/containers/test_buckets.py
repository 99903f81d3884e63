"""kohya's aspect-ratio buckets: the bucket list, which bucket an image takes, and how it is fitted.

Expected sizes are worked out by hand from kohya's rules (see `loraflow_training.buckets`).
"""

from __future__ import annotations

import pytest
from loraflow_training.buckets import BucketFit, Bucketing, bucket_resolutions

SD15 = (512, 512)
# kohya's 17 buckets for 512x512, min 256, max 1024, steps 64 (the widely published SD 1.5 table).
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_given_sd15_resolution_when_buckets_made_then_kohyas_table() -> None:
    assert bucket_resolutions(SD15, 256, 1024, 64) == SD15_BUCKETS


@pytest.mark.parametrize(
    ("resolution", "min_reso", "max_reso", "step"),
    [
        ((512, 512), 256, 1024, 64),
        ((1024, 1024), 512, 2048, 64),
        ((768, 512), 320, 960, 32),
        ((64, 64), 64, 128, 8),
    ],
)
def test_given_any_settings_when_buckets_made_then_each_fits_the_area_steps_and_bounds(
    resolution: tuple[int, int], min_reso: int, max_reso: int, step: int
) -> None:
    buckets = bucket_resolutions(resolution, min_reso, max_reso, step)

    assert buckets
    for width, height in buckets:
        assert width * height <= resolution[0] * resolution[1]
        assert width % step == 0 and height % step == 0
        assert min_reso <= min(width, height) and max(width, height) <= max_reso


@pytest.mark.parametrize(
    ("image", "bucket", "resized"),
    [
        ((1000, 1000), (512, 512), (512, 512)),  # square: shrunk
        ((64, 64), (512, 512), (512, 512)),  # square: upscaled (no_upscale is off)
        ((600, 800), (448, 576), (448, 597)),  # portrait 0.75: nearest is 448/576 = 0.78
        ((1600, 900), (640, 384), (683, 384)),  # landscape 1.78: nearest is 640/384 = 1.67
        ((448, 576), (448, 576), (448, 576)),  # already a bucket size: kept as is
        ((300, 1200), (256, 1024), (256, 1024)),  # exactly 1:4
    ],
)
def test_given_image_size_when_bucketed_then_nearest_aspect_bucket_covered(
    image: tuple[int, int], bucket: tuple[int, int], resized: tuple[int, int]
) -> None:
    fit = Bucketing(SD15, enabled=True).fit(*image)

    assert fit == BucketFit(bucket=bucket, resized=resized)


@pytest.mark.parametrize(
    ("image", "bucket", "resized"),
    [
        ((300, 400), (256, 384), (300, 400)),  # under the area: never upscaled, cropped to the steps
        ((2000, 1000), (640, 320), (640, 320)),  # over the area: shrunk to it, aspect kept
        ((512, 512), (512, 512), (512, 512)),
        ((100, 700), (64, 640), (100, 700)),  # far from any predefined bucket: its own bucket
    ],
)
def test_given_no_upscale_when_bucketed_then_only_shrunk_and_rounded_down_to_steps(
    image: tuple[int, int], bucket: tuple[int, int], resized: tuple[int, int]
) -> None:
    fit = Bucketing(SD15, enabled=True, no_upscale=True).fit(*image)

    assert fit == BucketFit(bucket=bucket, resized=resized)


def test_given_no_upscale_and_side_below_one_step_when_bucketed_then_one_step_and_upscaled() -> None:
    fit = Bucketing(SD15, enabled=True, step=128, no_upscale=True).fit(100, 300)

    assert fit == BucketFit(bucket=(128, 256), resized=(128, 384))


def test_given_no_upscale_and_extreme_aspect_when_bucketed_then_a_bucket_not_a_crash() -> None:
    fit = Bucketing((64, 64), enabled=True, min_reso=64, max_reso=512, no_upscale=True).fit(4096, 64)

    assert fit.bucket[0] % 64 == 0 and fit.bucket[1] == 64
    assert fit.resized[0] >= fit.bucket[0] and fit.resized[1] >= fit.bucket[1]


@pytest.mark.parametrize(
    ("resolution", "image", "resized"),
    [
        ((512, 512), (96, 80), (614, 512)),  # shorter side to 512, then centre crop
        ((768, 512), (512, 512), (768, 768)),  # wider target: width decides
        ((64, 64), (80, 96), (64, 77)),
    ],
)
def test_given_bucketing_off_when_fitted_then_cover_the_resolution(
    resolution: tuple[int, int], image: tuple[int, int], resized: tuple[int, int]
) -> None:
    fit = Bucketing(resolution, enabled=False, no_upscale=True).fit(*image)

    assert fit == BucketFit(bucket=resolution, resized=resized)


def test_given_fit_when_crop_box_then_centred_in_the_resized_image() -> None:
    fit = BucketFit(bucket=(448, 576), resized=(448, 597))

    assert fit.crop_box() == (0, 10, 448, 586)
