"""kohya's caption rules per step: shuffle with keep_tokens, dropout, and whether captions vary."""

from __future__ import annotations

import random

import pytest
from loraflow_training.captions import CaptionRules

CAPTION = "ohwx, red circle, blue sky, grass, sunny day"


def test_given_no_rules_when_applied_then_caption_unchanged_and_no_draws() -> None:
    rng = random.Random(0)
    state = rng.getstate()

    assert CaptionRules().apply(CAPTION, rng) == CAPTION
    assert rng.getstate() == state


def test_given_shuffle_with_keep_tokens_when_applied_then_kept_first_rest_permuted() -> None:
    rules = CaptionRules(shuffle=True, keep_tokens=1)
    rng = random.Random(7)

    seen = {rules.apply(CAPTION, rng) for _ in range(50)}

    assert len(seen) > 5  # 4 tokens shuffle 24 ways
    for caption in seen:
        tokens = caption.split(", ")
        assert tokens[0] == "ohwx"
        assert sorted(tokens[1:]) == sorted(["red circle", "blue sky", "grass", "sunny day"])


def test_given_same_seed_when_shuffled_then_same_captions() -> None:
    rules = CaptionRules(shuffle=True, keep_tokens=2)

    first_rng, second_rng = random.Random(3), random.Random(3)
    first = [rules.apply(CAPTION, first_rng) for _ in range(10)]
    second = [rules.apply(CAPTION, second_rng) for _ in range(10)]

    assert first == second
    assert all(caption.startswith("ohwx, red circle, ") for caption in first)


def test_given_custom_separator_when_shuffled_then_split_on_it_and_joined_like_kohya() -> None:
    rules = CaptionRules(shuffle=True, keep_tokens=1, separator="|")

    caption = rules.apply("ohwx| a | b |c||", random.Random(1))

    tokens = caption.split(", ")
    assert tokens[0] == "ohwx"
    assert sorted(tokens[1:]) == ["a", "b", "c"]  # empty tokens dropped


def test_given_shuffle_and_nothing_to_shuffle_when_applied_then_text_as_written() -> None:
    rules = CaptionRules(shuffle=True, keep_tokens=1)

    assert rules.apply("ohwx,dog", random.Random(0)) == "ohwx,dog"
    assert not rules.varies(["ohwx,dog", "ohwx"])


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_given_dropout_rate_when_applied_many_times_then_dropped_at_that_rate(rate: float) -> None:
    rules = CaptionRules(dropout_rate=rate)
    rng = random.Random(11)
    draws = 4000

    dropped = sum(rules.apply(CAPTION, rng) == "" for _ in range(draws))

    # binomial standard deviation is at most 0.008 here: 4 sigma of margin
    assert abs(dropped / draws - rate) < 0.03


def test_given_full_dropout_when_applied_then_always_empty() -> None:
    rules = CaptionRules(shuffle=True, dropout_rate=1.0)

    assert {rules.apply(CAPTION, random.Random(seed)) for seed in range(20)} == {""}


@pytest.mark.parametrize(
    ("rules", "varies"),
    [
        (CaptionRules(), False),
        (CaptionRules(dropout_rate=0.05), True),
        (CaptionRules(shuffle=True), True),
        (CaptionRules(shuffle=True, keep_tokens=4), False),  # one token left: nothing moves
        (CaptionRules(shuffle=True, keep_tokens=3), True),
    ],
)
def test_given_rules_when_asked_if_captions_vary_then_only_when_some_caption_can_change(
    rules: CaptionRules, varies: bool
) -> None:
    assert rules.varies([CAPTION, "ohwx"]) is varies
