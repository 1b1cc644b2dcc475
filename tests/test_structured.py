"""Structured output: JSON schemas, regexes and grammars enforced while decoding (mlxllama.constrain)."""

from __future__ import annotations

import json
import re

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field

from mlxllama import batch_generate, generate, stream_generate
from mlxllama.cli import cli
from mlxllama.constrain import apply_bitmask, compile_constraint, token_table
from mlxllama.errors import GrammarError, InputError
from tinymodels import write_model

# Three schemas whose outputs stay short (bounded strings and numbers), covering nested objects,
# arrays, enums, bounded numbers, required fields and string patterns.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 12},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        }, "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
TAGS = {
    "type": "object",
    "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["colors", "mood"],
    "additionalProperties": False,
}
REVIEW = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "recommended": {"type": "boolean"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    },
    "required": ["score", "recommended", "code"],
    "additionalProperties": False,
}
YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}

SUBJECTS = ["a doctor", "a pilot", "a farmer", "a student", "a painter", "a chef", "a teacher", "a baker",
            "a singer", "a nurse", "a sailor", "a writer", "a judge", "a dancer", "a miner", "a poet",
            "a tailor", "a driver", "a monk", "a clerk"]


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True)


@pytest.fixture(scope="module")
def smol(default_model_dir):
    return mlxllama.load(default_model_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlxllama.load(write_model(tmp_path_factory.mktemp("structured") / "tiny", max_position_embeddings=2048))


# -- the mask ----------------------------------------------------------------------------------


def test_bitmask_matches_llguidance_numpy_and_pads_wider_logits():
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(0)
    words = rng.integers(-(1 << 31), 1 << 31, size=(2, 4), dtype=np.int64).astype(np.int32)  # 128 tokens
    logits = rng.normal(size=(2, 128)).astype(np.float32)
    want = logits.copy()
    apply_token_bitmask_inplace(want, words)
    got = np.array(apply_bitmask(mx.array(logits), words))
    assert np.array_equal(np.isinf(got), np.isinf(want)) and np.allclose(got[~np.isinf(got)], want[~np.isinf(want)])
    wider = np.array(apply_bitmask(mx.array(rng.normal(size=(2, 140)).astype(np.float32)), words))
    assert np.isinf(wider[:, 128:]).all()  # rows past the vocabulary are never allowed


def test_token_table_is_built_once_per_tokenizer(tiny):
    _, tokenizer = tiny
    assert token_table(tokenizer) is token_table(tokenizer)


def test_random_model_sampling_always_follows_the_grammar(tiny):
    """A random model sampled at temperature 1 writes what the grammar allows, and stops when done."""
    model, tokenizer = tiny
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5},
                                               "s": {"enum": ["ab", "cd"]}},
              "required": ["n", "s"], "additionalProperties": False}
    for seed in range(4):
        out = generate(model, tokenizer, "x", max_tokens=40, temp=1.0, seed=seed, response_format=schema)
        jsonschema.validate(json.loads(out), schema)
        text = generate(model, tokenizer, "x", max_tokens=12, temp=1.0, seed=seed,
                        response_format={"type": "regex", "regex": "[0-9]{2}-[a-c]{3}"})
        assert re.fullmatch(r"[0-9]{2}-[a-c]{3}", text), text
    records = list(stream_generate(model, tokenizer, "x", max_tokens=20, response_format={"type": "choice",
                                                                                        "choices": ["ab", "cd"]}))
    assert "".join(r.text for r in records) in ("ab", "cd") and records[-1].finish_reason == "stop"


# -- the real default model --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("schema", [PERSON, TAGS, REVIEW], ids=["nested", "arrays_enums", "numbers_patterns"])
def test_twenty_prompts_validate(smol, schema):
    model, tokenizer = smol
    prompts = [chat(tokenizer, f"Describe {s} as JSON.") for s in SUBJECTS]
    outs = batch_generate(model, tokenizer, prompts, max_tokens=64, response_format=schema)
    for out in outs:
        jsonschema.validate(json.loads(out), schema)


@pytest.mark.slow
def test_regex_and_lark_grammar_on_twenty_prompts(smol):
    model, tokenizer = smol
    prompts = [chat(tokenizer, f"Is {s} happy? Answer yes or no and say why.") for s in SUBJECTS]
    pattern = r"(Yes|No), because [a-z ]{1,24}\."
    for out in batch_generate(model, tokenizer, prompts, max_tokens=40, response_format={"type": "regex",
                                                                                        "regex": pattern}):
        assert re.fullmatch(pattern, out), out
    grammar = '''
start: greeting " " NAME "! " count " " animal "."
greeting: "Hello" | "Hi" | "Dear"
count: "one" | "two" | "three"
animal: "cats" | "dogs" | "birds"
NAME: /[A-Z][a-z]{1,10}/
'''
    prompts = [chat(tokenizer, f"Greet {s} and count some animals.") for s in SUBJECTS]
    shape = r"(Hello|Hi|Dear) [A-Z][a-z]{1,10}! (one|two|three) (cats|dogs|birds)\."
    for out in batch_generate(model, tokenizer, prompts, max_tokens=30, response_format={"type": "lark",
                                                                                        "grammar": grammar}):
        assert re.fullmatch(shape, out), out


@pytest.mark.slow
def test_batch_of_four_prompts_with_four_schemas(smol):
    model, tokenizer = smol
    schemas = [PERSON, TAGS, REVIEW, YES_NO]
    prompts = [chat(tokenizer, q) for q in ["Describe a pilot.", "Which colors do you like?", "Review a film.",
                                            "Is water wet?"]]
    outs = batch_generate(model, tokenizer, prompts, max_tokens=64, response_format=schemas)
    for out, schema in zip(outs, schemas):
        jsonschema.validate(json.loads(out), schema)


@pytest.mark.slow
def test_pydantic_model_and_gbnf(smol):
    model, tokenizer = smol

    class City(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=16)
        country: str = Field(max_length=16)
        million_people: int = Field(ge=0, le=40)

    out = generate(model, tokenizer, chat(tokenizer, "Tell me about Paris."), max_tokens=48, response_format=City)
    assert City.model_validate_json(out).name
    gbnf = 'root ::= "The answer is " [0-9]{1,3} "."'
    c = compile_constraint(tokenizer, "gbnf", gbnf)
    out = generate(model, tokenizer, chat(tokenizer, "What is 2+2?"), max_tokens=12, response_format=c)
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", out), out


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, spec, words", [
    ("json_schema", {"type": "strin"}, "strin"),
    ("json_schema", {"type": "string", "format": "no-such-format"}, "no-such-format"),  # unsupported feature
    ("json_schema", {"$ref": "http://example.com/schema.json"}, "example.com"),
    ("json_schema", "{not json", "not valid JSON"),
    ("regex", "[a-z", "unclosed character class"),
    ("lark", "start: missing_rule", "missing_rule"),
    ("gbnf", 'root ::= "open', "GBNF"),
    ("choice", [], "choices"),
    ("nonsense", "x", "unknown constraint kind"),
])
def test_bad_constraints_raise_grammar_error_with_the_engine_message(tiny, kind, spec, words):
    _, tokenizer = tiny
    with pytest.raises(GrammarError) as e:
        compile_constraint(tokenizer, kind, spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unsupported_combinations_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(GrammarError, match="speculative"):
        generate(model, tokenizer, "x", max_tokens=4, prompt_lookup=2, response_format=YES_NO)
    with pytest.raises(InputError, match="2 entries for 3 prompts"):
        batch_generate(model, tokenizer, ["a", "b", "c"], max_tokens=2, response_format=[YES_NO, None])


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_json_schema_regex_choice_and_grammar(tiny, tmp_path):
    model_dir = str(tiny[0].model_dir)
    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(YES_NO))
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", "--model", model_dir, "-p", "x", "--temp", "1", "--seed", "3",
                            "--json-schema", str(schema_file)])
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.output), YES_NO)
    r = runner.invoke(cli, ["generate", "--model", model_dir, "-p", "x", "--json-schema", json.dumps(YES_NO)])
    jsonschema.validate(json.loads(r.output), YES_NO)
    r = runner.invoke(cli, ["generate", "--model", model_dir, "-p", "x", "-n", "10", "--regex", "[a-c]{4}"])
    assert re.fullmatch("[a-c]{4}", r.output.strip())
    r = runner.invoke(cli, ["generate", "--model", model_dir, "-p", "x", "-p", "y", "--choice", "left", "--choice", "right"])
    assert r.exit_code == 0 and all(line in ("left", "right") for line in r.output.split("\n")
                                    if line and not line.startswith("---"))
    (tmp_path / "g.gbnf").write_text('root ::= "n=" [0-9] [0-9]?\n')
    r = runner.invoke(cli, ["generate", "--model", model_dir, "-p", "x", "-n", "6", "--grammar", str(tmp_path / "g.gbnf")])
    assert re.fullmatch(r"n=[0-9]{1,2}", r.output.strip()), r.output


@pytest.mark.parametrize("args, words", [
    (["--regex", "[a-z"], "unclosed character class"),
    (["--json-schema", '{"type": "strin"}'], "strin"),
    (["--json-schema", "missing.json"], "no such file"),
    (["--grammar", "missing.lark"], "cannot read grammar file"),
    (["--regex", "a", "--choice", "b"], "only one of"),
    (["--regex", "a", "--prompt-lookup", "2"], "cannot be combined"),
])
def test_cli_bad_constraints_are_one_line(tiny, capsys, args, words):
    from mlxllama.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny[0].model_dir), "-p", "x", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and words in err and "\n" not in err


def test_forced_tokens_skip_the_sampler_and_share_model_calls(tiny):
    """Between JSON fields the grammar forces the text ('", "second_field_name": '): those tokens
    are read with the sampled token in one model call."""
    model, tokenizer = tiny

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    schema = {"type": "object", "properties": {"first_field_name": {"enum": ["a", "b"]},
                                               "second_field_name": {"enum": ["c", "d"]}},
              "required": ["first_field_name", "second_field_name"], "additionalProperties": False}
    counting = Counting(model)
    records = list(stream_generate(counting, tokenizer, "x", max_tokens=60, temp=1.0, seed=0,
                                   response_format=schema))
    text = "".join(r.text for r in records)
    jsonschema.validate(json.loads(text), schema)
    assert records[-1].finish_reason == "stop"
    assert counting.calls < len(records) / 2  # most of the text was forced
    forced = [r for r in records if float(r.logprobs[r.token]) == 0.0 and mx.sum(mx.isinf(r.logprobs)).item()
              == r.logprobs.size - 1]
    assert forced  # a forced token's distribution is all on that token


def test_batch_constraint_rows_on_the_engine_reuse_a_cached_prefix(tiny):
    """Constrained rows run on the batch engine beside free ones; a cached prompt prefix is reused
    (the constraint concerns only generated tokens)."""
    from mlxllama.engine import PrefixCache

    model, tokenizer = tiny
    cache = PrefixCache(min_tokens=4)
    prompt = "a long shared opening for every request " * 3
    pattern = r"(yes|no)!"
    fmt = {"type": "regex", "regex": pattern}
    first = batch_generate(model, tokenizer, [prompt, prompt + "x"], max_tokens=12, response_format=[fmt, None],
                           prefix_cache=cache)
    assert re.fullmatch(pattern, first[0]), first
    again = batch_generate(model, tokenizer, [prompt + "y"], max_tokens=12, response_format=fmt, prefix_cache=cache,
                           temp=1.0, seed=3)
    assert re.fullmatch(pattern, again[0]), again
    assert cache.lookup(tokenizer.encode(prompt + "y"), probe=True) > 0  # the cache held the shared prefix


def test_constrained_stream_with_a_quantized_kv_cache(tmp_path):
    from mlxllama.models import make_cache
    from mlxllama.models.cache import QuantizedKVCache

    model, tokenizer = mlxllama.load(write_model(tmp_path / "hd32", "linear_rope_head_dim"))  # head_dim 32
    cache = make_cache(model)
    pattern = r"[a-c]{3,6}\."
    text = generate(model, tokenizer, "x", max_tokens=10, response_format={"type": "regex", "regex": pattern},
                    prompt_cache=cache, kv_bits=8, kv_group_size=32)
    assert re.fullmatch(pattern, text), text
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
