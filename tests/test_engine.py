"""The batched engine on tiny random models: sequences joining and leaving mid-way give what each
gets alone; per-row samplers and processors; the prefix cache; the quantized KV cache."""

import mlx.core as mx
import pytest

import mlxllama
from mlxllama.engine import BatchEngine, PrefixCache
from mlxllama.engine.prefix_cache import states_nbytes
from mlxllama.models.cache import KVCache, QuantizedKVCache, to_quantized
from mlxllama.sample import make_logit_bias, make_sampler
from tinymodels import scale_weights, write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """head_dim 32, so the KV cache can be quantized in groups of 32."""
    path = write_model(tmp_path_factory.mktemp("engine") / "tiny", "linear_rope_head_dim", max_position_embeddings=4096)
    return mlxllama.load(scale_weights(path, 8))


def alone(tiny, prompt, max_tokens, **kwargs):
    model, tokenizer = tiny
    records = list(mlxllama.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs))
    return [r.token for r in records if r.token >= 0], "".join(r.text for r in records)


def run(engine, schedule, max_steps=500):
    """schedule: {step number: [(name, prompt, kwargs)]}; returns {name: (tokens, text, reason)}."""
    names, results = {}, {}
    for step in range(max_steps):
        for name, prompt, kwargs in schedule.get(step, []):
            names[engine.add(prompt, **kwargs)] = name
            results[name] = ([], "", None)
        if not engine.has_work and step > max(schedule):
            break
        for out in engine.step():
            toks, text, _ = results[names[out.uid]]
            results[names[out.uid]] = (toks + ([out.token] if out.token >= 0 else []), text + out.text,
                                       out.finish_reason)
    return results


PROMPTS = ["hello there", "in the other", "a much longer prompt that is read in several chunks " * 3, "q", "er er"]


@pytest.mark.parametrize("overlap", [False, True])
def test_rows_joining_and_leaving_equal_each_alone(tiny, overlap):
    model, tokenizer = tiny
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    lengths = [12, 4, 9, 15, 6]  # some leave early, others join while they run
    schedule = {0: [(0, encoded[0], {"max_tokens": lengths[0]}), (1, encoded[1], {"max_tokens": lengths[1]})],
                3: [(2, encoded[2], {"max_tokens": lengths[2]})],
                5: [(3, encoded[3], {"max_tokens": lengths[3]}), (4, encoded[4], {"max_tokens": lengths[4]})]}
    engine = BatchEngine(model, tokenizer, max_batch=3, prefill_step=16, overlap=overlap)
    got = run(engine, schedule)
    for i in range(len(PROMPTS)):
        tokens, text = alone(tiny, encoded[i], lengths[i])
        assert got[i][0] == tokens and got[i][1] == text, i
        assert got[i][2] == "length" or tokenizer.eos_token_id in tokens
    assert not engine.has_work


def test_per_row_samplers_and_processors(tiny):
    model, tokenizer = tiny
    a, b = tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[1])
    greedy_a, _ = alone(tiny, a, 8)
    bias = {greedy_a[0]: -100.0, greedy_a[1]: -100.0}
    engine = BatchEngine(model, tokenizer, max_batch=4)
    got = run(engine, {0: [("biased", a, {"max_tokens": 8, "logits_processors": [make_logit_bias(bias)]}),
                           ("sampled", b, {"max_tokens": 8, "sampler": make_sampler(1.0, seed=3)}),
                           ("plain", a, {"max_tokens": 8})]})
    assert got["plain"][0] == greedy_a
    assert got["biased"][0] == alone(tiny, a, 8, logit_bias=bias)[0] and got["biased"][0][0] != greedy_a[0]
    assert got["sampled"][0] == alone(tiny, b, 8, sampler=make_sampler(1.0, seed=3))[0]


def test_stop_strings_in_the_engine(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPTS[0])
    _, full = alone(tiny, prompt, 20)
    if len(full) < 6:
        pytest.skip("the random model stopped at once")
    stop = full[3:5]
    got = run(BatchEngine(model, tokenizer), {0: [("s", prompt, {"max_tokens": 20, "stop": [stop]})]})
    assert got["s"][1] == alone(tiny, prompt, 20, stop=[stop])[1] and got["s"][2] == "stop"


def test_batch_generate_with_per_prompt_samplers(tiny):
    model, tokenizer = tiny
    out = mlxllama.batch_generate(model, tokenizer, PROMPTS[:3], max_tokens=6, max_batch=2,
                                  samplers=[None, make_sampler(0.7, seed=1), None])
    assert out[0] == alone(tiny, PROMPTS[0], 6)[1] and out[2] == alone(tiny, PROMPTS[2], 6)[1]
    assert out[1] == alone(tiny, PROMPTS[1], 6, sampler=make_sampler(0.7, seed=1))[1]


def test_prefix_cache_hit_equals_cold_and_is_not_corrupted(tiny):
    model, tokenizer = tiny
    shared = tokenizer.encode("a shared system prompt that both requests begin with, " * 2)
    first, second = shared + tokenizer.encode(" first question"), shared + tokenizer.encode(" other one")
    cold = {n: alone(tiny, p, 10)[0] for n, p in [("first", first), ("second", second)]}
    cache = PrefixCache(max_bytes=1 << 30)
    engine = BatchEngine(model, tokenizer, prefix_cache=cache)
    assert run(engine, {0: [("first", first, {"max_tokens": 10})]})["first"][0] == cold["first"]
    assert len(cache) == 1 and cache.nbytes > 0
    got = run(engine, {0: [("second", second, {"max_tokens": 10})]})
    assert got["second"][0] == cold["second"]
    assert cache.hits == 1
    # the entry the second request started from still gives the first its own answer
    got = run(engine, {0: [("again", first, {"max_tokens": 10}), ("fresh", second, {"max_tokens": 10})]})
    assert got["again"][0] == cold["first"] and got["fresh"][0] == cold["second"]
    assert cache.hits >= 2


def test_prefix_cache_lookup_and_eviction(tiny):
    model, _ = tiny
    cache = PrefixCache(max_bytes=1 << 30, min_tokens=1)

    def states(n, value):
        return [(mx.full((1, 2, n, 32), value), mx.full((1, 2, n, 32), value)) for _ in model.layers]

    cache.insert([1, 2, 3, 4], states(4, 1.0))
    cache.insert([1, 2, 9], states(3, 2.0))
    hit = cache.lookup([1, 2, 3, 4, 5])
    assert hit.length == 4 and float(hit.states[0][0][0, 0, 3, 0]) == 1.0
    hit = cache.lookup([1, 2, 9, 9])
    assert hit.length == 3 and float(hit.states[0][0].sum()) == 2.0 * 2 * 3 * 32
    assert cache.lookup([7, 1]) is None
    cache.insert([1, 2, 3, 4, 5, 6], states(6, 3.0))  # covers [1, 2, 3, 4]: that entry goes
    assert len(cache) == 2
    per_entry = states_nbytes(states(3, 1.0))
    small = PrefixCache(max_bytes=int(per_entry * 1.5), min_tokens=1)
    small.insert([1, 2, 3], states(3, 1.0))
    small.insert([5, 6, 7], states(3, 1.0))  # the least recently used is evicted
    assert len(small) == 1 and small.lookup([1, 2, 3, 4]) is None and small.lookup([5, 6, 7, 8]).length == 3


def test_quantized_cache_close_to_float(tiny):
    model, tokenizer = tiny
    prompt = mx.array(tokenizer.encode(PROMPTS[2]))[None]
    float_cache, q_cache = model.make_cache(), [QuantizedKVCache(32, 8) for _ in model.layers]
    ref = model(prompt, cache=float_cache)
    q = model(prompt, cache=q_cache)
    assert mx.allclose(mx.softmax(ref, -1), mx.softmax(q, -1), atol=2e-2)
    step_ref = model(mx.array([[5]]), cache=float_cache)
    step_q = model(mx.array([[5]]), cache=q_cache)
    assert mx.allclose(mx.softmax(step_ref, -1), mx.softmax(step_q, -1), atol=2e-2)
    k = float_cache[0].state[0]
    assert q_cache[0].nbytes < 0.35 * 2 * k.nbytes  # 8 bits, groups of 32, float32 values
    four = to_quantized(float_cache[0], 32, 4)
    assert four.nbytes < 0.2 * 2 * k.nbytes and isinstance(float_cache[0], KVCache)


@pytest.mark.parametrize("start", [0, 20])
def test_quantized_batched_equals_quantized_alone(tiny, start):
    model, tokenizer = tiny
    encoded = [tokenizer.encode(p) for p in PROMPTS[:4]]
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=start)
    engine = BatchEngine(model, tokenizer, max_batch=4, prefill_step=16, **kv)
    got = run(engine, {0: [(i, p, {"max_tokens": 8}) for i, p in enumerate(encoded[:2])],
                       2: [(i + 2, p, {"max_tokens": 8}) for i, p in enumerate(encoded[2:])]})
    for i, p in enumerate(encoded):
        tokens, _ = alone(tiny, p, 8, **kv)
        assert got[i][0] == tokens, i
    # and 8-bit KV keeps the greedy output of the float cache on these prompts
    same = sum(alone(tiny, p, 8, **kv)[0] == alone(tiny, p, 8)[0] for p in encoded)
    assert same >= 3


def test_bad_kv_settings(tiny):
    model, tokenizer = tiny
    with pytest.raises(mlxllama.MlxllamaError, match="4, 8"):
        mlxllama.generate(model, tokenizer, "hi", kv_bits=3)
    with pytest.raises(mlxllama.MlxllamaError, match="group size"):
        mlxllama.generate(model, tokenizer, "hi", kv_bits=4, kv_group_size=16)


@pytest.mark.slow
def test_real_model_kv8_equals_float_single_and_batched(default_model_dir):
    model, tokenizer = mlxllama.load(default_model_dir)
    questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True) for q in questions]
    float_text = [mlxllama.generate(model, tokenizer, p, max_tokens=16) for p in prompts]
    assert "Paris" in float_text[0]
    assert [mlxllama.generate(model, tokenizer, p, max_tokens=16, kv_bits=8) for p in prompts] == float_text
    assert mlxllama.batch_generate(model, tokenizer, prompts, max_tokens=16, kv_bits=8) == float_text
    cache = PrefixCache()
    assert mlxllama.batch_generate(model, tokenizer, prompts[:1], max_tokens=16, prefix_cache=cache) == float_text[:1]
    assert mlxllama.batch_generate(model, tokenizer, prompts[:1], max_tokens=16, prefix_cache=cache) == float_text[:1]
    assert cache.hits == 1
