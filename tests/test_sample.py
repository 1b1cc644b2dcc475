"""Samplers and logits processors on hand-made distributions."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxllama.errors import InputError
from mlxllama.sample import (apply_min_p, apply_top_k, apply_top_p, make_logit_bias, make_repetition_penalty,
                             make_sampler)

PROBS = mx.array([[0.5, 0.3, 0.15, 0.05]])
LOGPROBS = mx.log(PROBS)


def kept(lp):
    return np.isfinite(np.array(lp[0])).tolist()


def test_greedy_at_temperature_zero():
    assert make_sampler(0.0)(LOGPROBS).tolist() == [0]
    assert make_sampler(0.0)(mx.log(mx.array([[0.1, 0.2, 0.7]]))).tolist() == [2]


def test_top_k_keeps_k_best():
    assert kept(apply_top_k(LOGPROBS, 2)) == [True, True, False, False]
    assert kept(apply_top_k(LOGPROBS, 0)) == [True] * 4


def test_top_p_keeps_smallest_set_reaching_mass():
    assert kept(apply_top_p(LOGPROBS, 0.5)) == [True, False, False, False]
    assert kept(apply_top_p(LOGPROBS, 0.6)) == [True, True, False, False]
    assert kept(apply_top_p(LOGPROBS, 0.9)) == [True, True, True, False]
    assert kept(apply_top_p(LOGPROBS, 1.0)) == [True] * 4


def test_min_p_relative_to_top_token():
    assert kept(apply_min_p(LOGPROBS, 0.5)) == [True, True, False, False]  # 0.15 < 0.25
    assert kept(apply_min_p(LOGPROBS, 0.05)) == [True, True, True, True]


def test_sampling_follows_the_distribution():
    sampler = make_sampler(1.0, seed=1)
    draws = np.array([sampler(LOGPROBS).item() for _ in range(2000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, np.array(PROBS[0]), atol=0.04)


def test_filters_apply_before_sampling():
    sampler = make_sampler(1.0, top_k=2, seed=3)
    assert {sampler(LOGPROBS).item() for _ in range(300)} == {0, 1}


def test_seed_reproduces_and_differs():
    a = [make_sampler(0.8, seed=7)(LOGPROBS).item() for _ in range(1)]
    s1, s2, s3 = make_sampler(0.8, seed=7), make_sampler(0.8, seed=7), make_sampler(0.8, seed=8)
    r1 = [s1(LOGPROBS).item() for _ in range(50)]
    r2 = [s2(LOGPROBS).item() for _ in range(50)]
    r3 = [s3(LOGPROBS).item() for _ in range(50)]
    assert r1 == r2 and r1 != r3 and a[0] == r1[0]


def test_repetition_penalty_and_logit_bias():
    logits = mx.array([[2.0, -1.0, 0.5, 1.0]])
    out = make_repetition_penalty(2.0)(mx.array([0, 1]), logits)
    np.testing.assert_allclose(np.array(out), [[1.0, -2.0, 0.5, 1.0]])
    out = make_logit_bias({3: 5.0})(mx.array([0]), logits)
    assert out[0, 3].item() == pytest.approx(6.0)


@pytest.mark.parametrize("kwargs", [dict(temp=-1), dict(temp=math.inf), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(min_p=1.0)])
def test_out_of_range_values_are_rejected(kwargs):
    with pytest.raises(InputError):
        make_sampler(**kwargs)


def test_presence_and_frequency_penalties_follow_openai():
    """logit[j] -= frequency * c[j] + presence * (c[j] > 0), c counting generated tokens only."""
    from mlxllama.sample import make_logits_processors

    logits = mx.array([[1.0, 1.0, 1.0, 1.0]])
    history = mx.array([3, 3, 0, 1, 1, 1])  # the prompt is [3, 3]; generated: 0 once, 1 three times
    (p,) = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25, prompt_tokens=2)
    np.testing.assert_allclose(np.array(p(history, logits)), [[1 - 0.25 - 0.5, 1 - 0.75 - 0.5, 1.0, 1.0]])
    assert make_logits_processors(presence_penalty=0.0, frequency_penalty=0.0) == []
    with pytest.raises(InputError):
        make_logits_processors(presence_penalty=2.5)
