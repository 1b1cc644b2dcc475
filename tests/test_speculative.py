"""Speculative decoding (prompt lookup, draft model) gives exactly plain greedy output; rejection
sampling keeps the model's distribution; batched output equals per-prompt output."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxllama.generate import batch_generate, generate_step, stream_generate
from mlxllama.sample import make_logits_processors, make_sampler
from mlxllama.speculative import PromptLookup, speculative_generate_step, verify
from tinymodels import make_model, write_model


@pytest.fixture(scope="module")
def model():
    return make_model("gqa_tied", seed=0)[0]


@pytest.fixture(scope="module")
def draft():
    return make_model("gqa_tied", seed=1, num_hidden_layers=1)[0]


def plain(model, prompt, n, **kw):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, **kw)]


def spec(model, prompt, n, **kw):
    out = list(speculative_generate_step(mx.array(prompt), model, max_tokens=n, **kw))
    return [t for t, _, _ in out], [d for _, _, d in out]


# A prompt that repeats itself, so prompt lookup finds matches (random model: some are rejected).
REPEAT = [5, 9, 12, 40, 41, 42, 7, 5, 9, 12, 40, 41, 42, 7, 5, 9, 12]


def test_prompt_lookup_index():
    pl = PromptLookup([1, 2, 3, 4, 1, 2])
    assert pl.draft(2) == [3, 4]  # "1 2" was followed by "3 4"
    pl.extend([3])
    assert pl.draft(5) == [4, 1, 2, 3]  # trigram "1 2 3"
    assert PromptLookup([1, 2, 3]).draft(3) == []


@pytest.mark.parametrize("n_lookup", [1, 3, 8])
def test_prompt_lookup_equals_greedy(model, n_lookup):
    want = plain(model, REPEAT, 40)
    got, flags = spec(model, REPEAT, 40, prompt_lookup=n_lookup)
    assert got == want
    assert len(got) == 40


def test_prompt_lookup_long_repeats():
    """A prompt made of one long repeated stretch: many trigram matches, long drafts."""
    m = make_model("gqa_tied", seed=3)[0]
    prompt = list(range(10, 60)) * 2
    want = plain(m, prompt, 30)
    got, flags = spec(m, prompt, 30, prompt_lookup=5)
    assert got == want


@pytest.mark.parametrize("k", [1, 2, 5])
def test_draft_model_equals_greedy(model, draft, k):
    prompt = [3, 17, 99, 4, 250, 8]
    want = plain(model, prompt, 33)
    got, _ = spec(model, prompt, 33, draft_model=draft, num_draft_tokens=k)
    assert got == want


def test_self_draft_accepts_everything(model):
    """The model as its own draft: every drafted token is accepted."""
    prompt = [3, 17, 99, 4, 250, 8]
    want = plain(model, prompt, 24)
    got, flags = spec(model, prompt, 24, draft_model=model, num_draft_tokens=3)
    assert got == want
    assert sum(flags) == 18  # 6 rounds of 3 accepted drafts + 1 model token


def test_lookup_and_draft_model_together(model, draft):
    want = plain(model, REPEAT, 30)
    got, _ = spec(model, REPEAT, 30, draft_model=draft, prompt_lookup=4, num_draft_tokens=2)
    assert got == want


def test_processors_and_long_prompt(model, draft):
    """Repetition penalty applies per drafted position; a prompt longer than a prefill chunk."""
    procs = make_logits_processors(repetition_penalty=1.3)
    prompt = (REPEAT * 5)[:70]
    want = plain(model, prompt, 25, logits_processors=procs, prefill_step_size=16)
    got, _ = spec(model, prompt, 25, prompt_lookup=4, logits_processors=procs, prefill_step_size=16)
    assert got == want
    got, _ = spec(model, prompt, 25, draft_model=draft, logits_processors=procs, prefill_step_size=16)
    assert got == want


def test_rotating_cache(model):
    """With max_kv_size, drafting stops once the cache could no longer be rewound."""
    want = plain(model, REPEAT, 40, max_kv_size=32)
    got, _ = spec(model, REPEAT, 40, prompt_lookup=3, max_kv_size=32)
    assert got == want


def test_closing_early_trims_the_cache(model):
    cache = model.make_cache()
    gen = speculative_generate_step(mx.array(REPEAT), model, prompt_lookup=6, max_tokens=50, prompt_cache=cache)
    for i, _ in zip(range(5), gen):
        pass
    gen.close()
    assert cache[0].offset <= len(REPEAT) + 5


def test_stream_generate_with_lookup_and_draft(model, draft, tmp_path):
    from mlxllama.tokenizer import load_tokenizer

    path = write_model(tmp_path / "m")
    tok = load_tokenizer(str(path), eos_token_ids=[])
    text = "the cat sat on the mat. the cat sat on the"
    want = [r.token for r in stream_generate(model, tok, text, max_tokens=20)]
    for kw in ({"prompt_lookup": 4}, {"draft_model": draft}):
        got = [r.token for r in stream_generate(model, tok, text, max_tokens=20, **kw)]
        assert got == want


# --- sampling: the output distribution is the model's ---------------------------------------

def empirical_first_token(p_logits, q_logits, sampler, distribution, n=3000):
    """Frequencies of the first emitted token; the draft is fixed (a point mass: token 1) when
    q_logits is None, else drawn from q each time, as a draft model does."""
    counts = np.zeros(p_logits.shape[-1])
    for _ in range(n):
        drafts = [1] if q_logits is None else [mx.random.categorical(q_logits[0]).item()]
        out = verify(p_logits, drafts, q_logits, sampler, distribution)
        counts[out[0]] += 1
    return counts / n


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_keeps_the_distribution(with_q):
    mx.random.seed(0)
    V = 6
    p = mx.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04], [0.2] * 5 + [0.0]])  # (k+1, V) for k=1
    q = mx.array([[0.05, 0.6, 0.05, 0.1, 0.1, 0.1]])  # draft's distribution (k, V)
    p_lp, q_lp = mx.log(p + 1e-12), mx.log(q)
    sampler = make_sampler(temp=1.0)

    def distribution(lp):
        return lp  # temperature 1, no filtering

    freq = empirical_first_token(p_lp, q_lp if with_q else None, sampler, distribution if with_q else None)
    np.testing.assert_allclose(freq, np.array(p[0]), atol=0.03)


# --- batched generation ----------------------------------------------------------------------

def test_batched_equals_single(tmp_path):
    from mlxllama.loader import load

    path = write_model(tmp_path / "m")
    m, tok = load(str(path))
    tok_eos = tok.eos_token_ids
    prompts = ["the cat", "a much longer prompt about the weather", "in"]
    want = [
        "".join(r.text for r in stream_generate(m, tok, p, max_tokens=12)) for p in prompts
    ]
    got = batch_generate(m, tok, prompts, max_tokens=12)
    assert got == want, tok_eos


# --- the compiled decode step ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", "qwen2_bias"], ids=["tied", "llama3-rope", "qwen2-bias"])
def test_compiled_step_equals_plain_step(name):
    """Same tokens and (to float rounding) the same logprobs, across a capacity growth."""
    from mlxllama import compiled

    m = make_model(name, seed=2)[0]
    prompt = mx.array([3, 17, 99, 4, 250, 8, 9])
    n = 40
    old = compiled.CAPACITY_STEP
    compiled.CAPACITY_STEP = 16  # force the preallocated cache to grow (and a retrace) mid-way
    try:
        want = list(generate_step(prompt, m, max_tokens=n))
        got = list(generate_step(prompt, m, max_tokens=n, compiled=True))
    finally:
        compiled.CAPACITY_STEP = old
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_compiled_forward_matches_model_logits(model):
    """One compiled step gives the model's own logits for the next position."""
    from mlxllama.compiled import CompiledForward
    from mlxllama.generate import prefill

    cache = model.make_cache()
    prompt = mx.array([3, 17, 99, 4, 250, 8])
    last = prefill(model, prompt, cache)
    ref_cache = model.make_cache()
    want = model(prompt[None], cache=ref_cache)[:, -1, :]
    fwd = CompiledForward(model, cache)
    got = fwd(last)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)


# --- prompt attention with the softmax on the host (CPU) -------------------------------------

@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", "none"])
def test_host_softmax_attention_equals_mlx(mask_kind):
    from mlxllama.models import host_ops

    mx.random.seed(0)
    B, H, Hkv, L, S, D = 2, 6, 2, 20, 33, 16
    q, k, v = (mx.random.normal(s) for s in [(B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D)])
    qi, ki = mx.arange(S - L, S)[:, None], mx.arange(S)[None]
    mask = {"causal": "causal", "none": None,
            "bool": ((qi >= ki)[None] & (ki[None] >= mx.array([0, 5])[:, None, None]))[:, None],  # padding
            "additive": mx.where(qi >= ki, 0.0, -1e9)}[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = host_ops.attention(q, k, v, 0.25, mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_prefill_with_host_softmax_equals_mlx_softmax(model, monkeypatch):
    """A long prompt: the cache and the next-token logits agree with the MLX-only path."""
    from mlxllama.models import host_ops

    prompt = mx.array((REPEAT * 10)[:150])
    want = plain(model, prompt.tolist(), 12, prefill_step_size=64)
    monkeypatch.setattr(host_ops, "MIN_QUERIES", 10**9)  # MLX's softmax and SiLU everywhere
    assert plain(model, prompt.tolist(), 12, prefill_step_size=64) == want


def test_host_swiglu_equals_mlx():
    import mlx.nn as nn

    from mlxllama.models import host_ops

    g, u = mx.random.normal((2, 20, 48)) * 30, mx.random.normal((2, 20, 48))
    np.testing.assert_allclose(np.array(host_ops.swiglu(g, u)), np.array(nn.silu(g) * u), rtol=1e-5, atol=1e-6)
