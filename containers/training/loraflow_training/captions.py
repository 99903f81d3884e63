"""kohya's per-step caption processing: `caption_dropout_rate`, `shuffle_caption`, `keep_tokens`.

Follows kohya-ss/sd-scripts `BaseDataset.process_caption`: the dropout draw comes first (a dropped
caption is ""); otherwise, with `shuffle_caption`, the caption is split on `caption_separator`,
the first `keep_tokens` tokens stay in place, the rest are shuffled, and the tokens are joined with
", " (kohya joins with ", " whatever the separator). One deviation: empty tokens (from a trailing or
doubled separator) are dropped instead of being kept as empty items.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from loraflow_shared.dataset.config import TrainingConfig

JOINER = ", "


@dataclass(frozen=True)
class CaptionRules:
    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","
    dropout_rate: float = 0.0

    @classmethod
    def from_config(cls, config: TrainingConfig) -> CaptionRules:
        return cls(
            shuffle=config.shuffle_caption,
            keep_tokens=config.keep_tokens,
            separator=config.caption_separator,
            dropout_rate=config.caption_dropout_rate,
        )

    def apply(self, caption: str, rng: random.Random) -> str:
        """The caption one training step sees; draws from `rng` only when a rule is on."""
        if self.dropout_rate > 0 and rng.random() < self.dropout_rate:
            return ""
        if not self.shuffle:
            return caption
        fixed, flexible = self._split(caption)
        if len(flexible) < 2:  # nothing to shuffle: keep the text as written, so it can be cached
            return caption
        rng.shuffle(flexible)
        return JOINER.join(fixed + flexible)

    def varies(self, captions: Iterable[str]) -> bool:
        """Whether some caption can differ between steps (then text embeddings cannot be cached).

        When False, `apply` returns every one of `captions` unchanged.
        """
        if self.dropout_rate > 0:
            return True
        return self.shuffle and any(len(self._split(caption)[1]) > 1 for caption in captions)

    def _split(self, caption: str) -> tuple[list[str], list[str]]:
        tokens = [token.strip() for token in caption.strip().split(self.separator)]
        tokens = [token for token in tokens if token]
        return tokens[: self.keep_tokens], tokens[self.keep_tokens :]
