"""kohya's aspect-ratio bucketing: which size each image trains at, and how it gets there.

Ported from kohya-ss/sd-scripts (`library/model_util.py` `make_bucket_resolutions`,
`library/train_util.py` `BucketManager.select_bucket`, `trim_and_resize_if_required`), so a dataset
lands in the same buckets as under kohya:

- Buckets have sides that are multiples of `bucket_reso_steps`, between `min_bucket_reso` and
  `max_bucket_reso`, and an area of at most the `resolution` area.
- An image goes to the bucket of nearest aspect ratio, is resized to cover it and centre-cropped.
- `bucket_no_upscale`: an image is only ever shrunk (to the resolution area when larger); its
  bucket is its (shrunk) size rounded down to `bucket_reso_steps`, whatever the min/max.
- Bucketing off: one bucket, the resolution itself (cover + centre crop), as kohya does.

Deviations, both where kohya crashes: under `bucket_no_upscale`, a side shorter than
`bucket_reso_steps` would give a zero-sized bucket; here that bucket side is `bucket_reso_steps` and
the image is upscaled to cover it. An aspect ratio so extreme that both of kohya's roundings give a
zero side (a division by zero there) is shrunk without rounding, then bucketed the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraflow_shared.dataset.config import TrainingConfig

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketFit:
    """Where an image of some size trains: resize it to `resized`, then centre-crop to `bucket`."""

    bucket: Size
    resized: Size

    def crop_box(self) -> tuple[int, int, int, int]:
        """The centre crop of the resized image, as Pillow's (left, upper, right, lower)."""
        left = (self.resized[0] - self.bucket[0]) // 2
        top = (self.resized[1] - self.bucket[1]) // 2
        return (left, top, left + self.bucket[0], top + self.bucket[1])


def bucket_resolutions(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's `make_bucket_resolutions`: the predefined buckets, sorted."""
    max_area = resolution[0] * resolution[1]
    square = int(math.sqrt(max_area) // step) * step
    resos = {(square, square)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, int((max_area // width) // step) * step)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


class Bucketing:
    """Assigns image sizes to buckets under one config's bucketing settings."""

    def __init__(
        self,
        resolution: Size,
        *,
        enabled: bool = False,
        min_reso: int = 256,
        max_reso: int = 1024,
        step: int = 64,
        no_upscale: bool = False,
    ) -> None:
        self.max_area = resolution[0] * resolution[1]
        self.step = step
        self.no_upscale = enabled and no_upscale
        if enabled:
            self.predefined = bucket_resolutions(resolution, min_reso, max_reso, step)
        else:
            self.predefined = [resolution]
        self._predefined_set = set(self.predefined)

    @classmethod
    def from_config(cls, config: TrainingConfig) -> Bucketing:
        return cls(
            config.resolution,
            enabled=config.enable_bucket,
            min_reso=config.min_bucket_reso,
            max_reso=config.max_bucket_reso,
            step=config.bucket_reso_steps,
            no_upscale=config.bucket_no_upscale,
        )

    def fit(self, width: int, height: int) -> BucketFit:
        """The bucket for an image of `width` x `height` (after EXIF orientation)."""
        if self.no_upscale:
            return self._fit_without_upscale(width, height)
        return self._fit_predefined(width, height)

    def _fit_predefined(self, width: int, height: int) -> BucketFit:
        aspect = width / height
        if (width, height) in self._predefined_set:
            bucket = (width, height)
        else:  # nearest aspect ratio; ties go to the first in sorted order, like numpy's argmin
            bucket = min(self.predefined, key=lambda reso: abs(reso[0] / reso[1] - aspect))
        # Scale so the image covers the bucket: match the side that is relatively shorter.
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketFit(bucket=bucket, resized=resized)

    def _fit_without_upscale(self, width: int, height: int) -> BucketFit:
        resized = self._shrink_to_area(width, height) if width * height > self.max_area else (width, height)
        bucket = (self._round_down(resized[0]), self._round_down(resized[1]))
        if bucket[0] > resized[0] or bucket[1] > resized[1]:  # a side below one step (see module doc)
            scale = max(bucket[0] / resized[0], bucket[1] / resized[1])
            resized = (math.ceil(resized[0] * scale), math.ceil(resized[1] * scale))
        return BucketFit(bucket=bucket, resized=resized)

    def _shrink_to_area(self, width: int, height: int) -> Size:
        """kohya: keep the aspect ratio at the resolution's area, with one side a multiple of the step."""
        aspect = width / height
        target_width = math.sqrt(self.max_area * aspect)
        target_height = self.max_area / target_width
        width_rounded = self._round(target_width)
        height_rounded = self._round(target_height)
        error_if_width = _aspect_error(width_rounded, self._round(width_rounded / aspect), aspect)
        error_if_height = _aspect_error(self._round(height_rounded * aspect), height_rounded, aspect)
        if math.isinf(error_if_width) and math.isinf(error_if_height):  # extreme aspect: kohya divides by 0
            return (max(1, round(target_width)), max(1, round(target_height)))
        if error_if_width < error_if_height:
            return (width_rounded, int(width_rounded / aspect + 0.5))
        return (int(height_rounded * aspect + 0.5), height_rounded)

    def _round(self, value: float) -> int:
        """kohya's `round_to_steps`: round to an integer, then down to a multiple of the step."""
        rounded = int(value + 0.5)
        return rounded - rounded % self.step

    def _round_down(self, side: int) -> int:
        return max(self.step, side - side % self.step)


def _aspect_error(width: int, height: int, aspect: float) -> float:
    """How far `width / height` is from `aspect`; a side rounded to zero is the worst choice."""
    return abs(width / height - aspect) if width and height else math.inf
