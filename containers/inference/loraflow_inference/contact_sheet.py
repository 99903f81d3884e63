"""One PNG of a job's previews: a row per prompt, labelled with it, the base model's picture beside the
LoRA's (same seed), so what the LoRA changed is seen at a glance."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

CELL = 256  # px per picture: small previews are scaled up (nearest: no blur), large ones down
LABEL_WIDTH = 240
HEADER = 28
PAD = 8
LABEL_CHARS = 26  # per line of the prompt's label at the font size below
FONT_SIZE = 15
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def contact_sheet(rows: Sequence[tuple[str, Image.Image, Image.Image]]) -> Image.Image:
    """`rows` of (prompt, base picture, LoRA picture) as one RGB image with column headers."""
    font = ImageFont.load_default(size=FONT_SIZE)
    width = LABEL_WIDTH + 2 * (CELL + PAD) + PAD
    sheet = Image.new("RGB", (width, HEADER + len(rows) * (CELL + PAD) + PAD), BACKGROUND)
    pen = ImageDraw.Draw(sheet)
    for column, title in enumerate(("base model", "with the LoRA")):
        pen.text((_column_x(column), PAD), title, fill=INK, font=font)
    for row, (prompt, base, lora) in enumerate(rows):
        top = HEADER + row * (CELL + PAD) + PAD
        label = "\n".join(textwrap.wrap(prompt, LABEL_CHARS, max_lines=CELL // (FONT_SIZE + 4)))
        pen.multiline_text((PAD, top), label, fill=INK, font=font)
        for column, picture in enumerate((base, lora)):
            sheet.paste(fit_cell(picture), (_column_x(column), top))
    return sheet


def _column_x(column: int) -> int:
    return LABEL_WIDTH + PAD + column * (CELL + PAD)


def fit_cell(picture: Image.Image) -> Image.Image:
    scale = CELL / max(picture.size)
    size = (round(picture.width * scale), round(picture.height * scale))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return picture.convert("RGB").resize(size, resample)
