"""Chat templates: real model templates (tests/templates/) rendered by mlxllama and by transformers
on the conversation shapes clients send; every render transformers completes must come out the
same, and every render it refuses must be refused. Also the sandbox, tools given as Python
functions, named templates and apply_chat_template's outputs. No model weights."""

from __future__ import annotations

import copy
import json
from enum import Enum
from pathlib import Path
from typing import Literal, Optional, Union

import pytest

from mlxllama.chat_template import render_chats
from mlxllama.errors import ChatTemplateError, InputError
from mlxllama.tokenizer import load_tokenizer
from mlxllama.tool_schema import get_json_schema
from tinymodels import byte_level_tokenizer_json

TEMPLATES = sorted((Path(__file__).parent / "templates").glob("*.jinja"))
CONFIG = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
          "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}


def get_time(zone: str, precise: bool = False) -> str:
    """The time now in a time zone.

    Args:
        zone: An IANA time zone, such as "Europe/Paris".
        precise: Whether to give seconds.

    Returns:
        The time as HH:MM.
    """
    return zone


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_TEXT_ARGS = {"id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What's the weather in Paris?"}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 18}'}

# (name, messages, extra keyword arguments)
SHAPES = [
    ("plain", [USER], {}),
    ("system", [SYSTEM, USER], {}),
    ("multi_turn", [SYSTEM, USER, {"role": "assistant", "content": "Sunny, 18 C."},
                    {"role": "user", "content": "And tomorrow?"}], {}),
    ("tool_call", [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}], {"tools": [WEATHER]}),
    ("tool_result", [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}, TOOL_RESULT],
     {"tools": [WEATHER]}),
    ("tool_result_text_args", [USER, {"role": "assistant", "content": None, "tool_calls": [CALL_TEXT_ARGS]},
                               TOOL_RESULT], {"tools": [WEATHER]}),
    ("tool_round_trip", [SYSTEM, USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}, TOOL_RESULT,
                         {"role": "assistant", "content": "It is 18 C."}, {"role": "user", "content": "Thanks"}],
     {"tools": [WEATHER]}),
    ("tool_call_nine_char_id_empty_content",
     [USER, {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "a1b2c3d4e"}]},
      {**TOOL_RESULT, "tool_call_id": "a1b2c3d4e"}], {"tools": [WEATHER]}),
    ("tools_given", [USER], {"tools": [WEATHER]}),
    ("tools_as_functions", [SYSTEM, USER], {"tools": [get_time]}),
    ("reasoning", [USER, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Look it up."},
                   {"role": "user", "content": "Sure?"}], {}),
    ("reasoning_alias", [USER, {"role": "assistant", "content": "Sunny.", "reasoning": "Look it up."}], {}),
    ("thinking_alias", [USER, {"role": "assistant", "content": "Sunny.", "thinking": "Look it up."},
                        {"role": "user", "content": "Sure?"}], {}),
    ("content_parts", [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                       {"role": "user", "content": [{"type": "text", "text": "Weather in "},
                                                    {"type": "text", "text": "Paris?"}]}], {}),
    ("none_values", [{"role": "user", "content": "Hi", "name": None},
                     {"role": "assistant", "content": "Hello", "tool_calls": None}], {}),
    ("thinking_off", [USER], {"enable_thinking": False}),
    ("user_twice", [USER, {"role": "user", "content": "Hello?"}], {}),
    ("assistant_first", [{"role": "assistant", "content": "Hi"}, USER], {}),
]
CONTINUE = [
    ("continue_final", [USER, {"role": "assistant", "content": "The weather in Paris is "}]),
    ("continue_final_no_space", [SYSTEM, USER, {"role": "assistant", "content": "Sunny"}]),
    ("continue_final_parts", [USER, {"role": "assistant", "content": [{"type": "text", "text": "It is "}]}]),
]


# Variables a template needs besides the messages (what its model's own code passes).
TEMPLATE_VARIABLES = {"fireworks-ai-llama-3-firefunction-v2": {"functions": json.dumps([WEATHER["function"]]),
                                                               "datetime": "2024-07-26 12:00"}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat_tok")
    (path / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json()))
    (path / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def ours(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _both(hf, ours, messages, **kwargs):
    """(transformers' render or its exception, ours or our exception)."""
    results = []
    for tok in (hf, ours):
        try:
            results.append(tok.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs))
        except Exception as e:  # transformers raises ValueError, TypeError, jinja2 errors ...
            results.append(e)
    return results


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_real_templates_render_as_transformers(hf, ours, path):
    template = path.read_text(encoding="utf-8")
    variables = TEMPLATE_VARIABLES.get(path.stem, {})
    cases = [(name, messages, {**extra, "add_generation_prompt": gen})
             for name, messages, extra in SHAPES for gen in (False, True)]
    cases += [(name, messages, {"continue_final_message": True}) for name, messages in CONTINUE]
    cases += [("continue_with_generation_prompt", CONTINUE[0][1],
               {"continue_final_message": True, "add_generation_prompt": True}),
              ("empty", [], {"add_generation_prompt": True})]
    completed = 0
    for name, messages, kwargs in cases:
        theirs, mine = _both(hf, ours, messages, chat_template=template, **variables, **kwargs)
        if isinstance(theirs, Exception):
            assert isinstance(mine, ChatTemplateError), f"{name}: transformers refused ({theirs!r}), we gave {mine!r}"
            assert "\n" not in str(mine), f"{name}: more than one line: {mine}"
        else:
            assert mine == theirs, f"{name} {kwargs}"
            completed += 1
    assert completed >= 2  # the comparison is not vacuous


def test_token_ids_match_transformers(hf, ours):
    template = (Path(__file__).parent / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    for _, messages, extra in SHAPES[:6]:
        kwargs = {**extra, "chat_template": template, "add_generation_prompt": True}
        assert ours.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(
            messages, return_dict=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# apply_chat_template: defaults, outputs, batches, named templates
# ---------------------------------------------------------------------------------------------


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_defaults_are_mlx_lm_s(ours):
    chat = [{"role": "user", "content": "hi"}]
    ids = ours.apply_chat_template(chat, chat_template=CHATML)
    assert isinstance(ids, list) and ours.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert ours.decode(ours.apply_chat_template(chat, chat_template=CHATML, add_generation_prompt=True)).endswith(
        "<|im_start|>assistant\n")


def test_outputs_dict_tensors_and_batches(ours, hf):
    import mlx.core as mx
    import numpy as np

    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question"}]]
    single = ours.apply_chat_template(chats[0], chat_template=CHATML, return_dict=True)
    assert set(single) == {"input_ids", "attention_mask"} and single["attention_mask"] == [1] * len(single["input_ids"])
    array = ours.apply_chat_template(chats[0], chat_template=CHATML, return_tensors="np")
    assert array.shape == (1, len(single["input_ids"]))
    assert isinstance(ours.apply_chat_template(chats[0], chat_template=CHATML, return_tensors="mlx"), mx.array)
    batch = ours.apply_chat_template(chats, chat_template=CHATML, tokenize=False)
    assert batch == hf.apply_chat_template(chats, chat_template=CHATML, tokenize=False)
    with pytest.raises(InputError, match="padding"):
        ours.apply_chat_template(chats, chat_template=CHATML, return_tensors="np")
    padded = ours.apply_chat_template(chats, chat_template=CHATML, padding=True, return_tensors="np", return_dict=True)
    reference = hf.apply_chat_template(chats, chat_template=CHATML, padding=True, return_tensors="np", return_dict=True)
    assert np.array_equal(padded["input_ids"], reference["input_ids"])
    assert np.array_equal(padded["attention_mask"], reference["attention_mask"])


GENERATION = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_assistant_tokens_mask_matches_transformers(ours, hf):
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}],
             [{"role": "user", "content": "a longer question here"}, {"role": "assistant", "content": "ok"}]]
    for conversation, extra in ((chats[0], {}), (chats, {"padding": True}),
                                (chats, {"truncation": True, "max_length": 9})):
        kwargs = {"chat_template": GENERATION, "return_dict": True, "return_assistant_tokens_mask": True, **extra}
        mine, theirs = ours.apply_chat_template(conversation, **kwargs), hf.apply_chat_template(conversation, **kwargs)
        assert mine["assistant_masks"] == theirs["assistant_masks"] and mine["input_ids"] == theirs["input_ids"]
        if not extra:  # the assistant's tokens, and only those, are marked
            marked = [t for t, m in zip(mine["input_ids"], mine["assistant_masks"]) if m]
            assert ours.decode(marked) == "hello there<|im_end|>yes<|im_end|>"
    with pytest.raises(ChatTemplateError, match="return_dict"):
        ours.apply_chat_template(chats[0], chat_template=GENERATION, return_assistant_tokens_mask=True)


def test_named_templates_and_tool_use(folder, tmp_path, hf):
    path = tmp_path / "named"
    path.mkdir()
    for name in ("tokenizer.json",):
        (path / name).write_bytes((folder / name).read_bytes())
    named = [{"name": "default", "template": "default:{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "tools:{{ tools | length }}"},
             {"name": "rag", "template": "rag:{{ documents[0]['title'] }}"}]
    (path / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "chat_template": named}))
    tok = load_tokenizer(path)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "default:hi"
    assert tok.apply_chat_template(chat, tools=[WEATHER], tokenize=False) == "tools:1"
    assert tok.apply_chat_template(chat, chat_template="rag", documents=[{"title": "T", "text": "x"}],
                                   tokenize=False) == "rag:T"
    assert tok.apply_chat_template(chat, chat_template="inline {{ 1 + 1 }}", tokenize=False) == "inline 2"
    (path / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "chat_template": named[1:]}))
    with pytest.raises(ChatTemplateError, match="none is the default"):
        load_tokenizer(path).apply_chat_template(chat)


def test_continue_final_message_is_exact(ours):
    chat = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "The capital is "}]
    text = ours.apply_chat_template(chat, chat_template=CHATML, continue_final_message=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nThe capital is ")
    with pytest.raises(ChatTemplateError, match="not compatible"):
        ours.apply_chat_template(chat, chat_template=CHATML, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        ours.apply_chat_template([], chat_template=CHATML)


# ---------------------------------------------------------------------------------------------
# Tools as Python functions
# ---------------------------------------------------------------------------------------------


class Color(Enum):
    RED = "red"
    GREEN = "green"


def plan_trip(city: str, days: int, budget: Optional[float], tags: list[str], prices: dict[str, float],
              mode: Literal["car", "train"] = "train", color: Color = Color.RED,
              point: tuple[int, float] = (0, 0.0), either: Union[int, str] = 0, choice: str = "a") -> dict:
    """Plans a trip.

    Longer explanation that is part of the description.

    Args:
        city: Where to go.
        days (int): How many days,
            counted from today.
        budget: Money to spend, or none.
        tags: Labels.
        prices: Prices by item.
        mode: How to travel.
        color: A colour.
        point: A point.
        either: Number or name.
        choice: One letter (choices: ["a", "b"])

    Returns:
        The plan.
    """
    return {}


class Calendar:
    def add(self, title: str) -> None:
        """Adds an event.

        Args:
            title: The event's title.
        """


def test_function_schemas_match_transformers():
    utils = pytest.importorskip("transformers.utils")
    for func in (get_time, plan_trip, Calendar().add):
        assert get_json_schema(func) == utils.get_json_schema(func)


def no_doc(x: int) -> int:
    return x


def missing_arg(x: int, y: int) -> int:
    """Adds.

    Args:
        x: The first.
    """
    return x + y


def custom_type(x: Calendar) -> None:
    """Uses a calendar.

    Args:
        x: The calendar.
    """


def no_hint(x) -> None:
    """No hint.

    Args:
        x: Anything.
    """


@pytest.mark.parametrize("func, match", [(no_doc, "no docstring"), (missing_arg, "argument 'y'"),
                                         (custom_type, "argument x"), (no_hint, "no type hint")])
def test_function_schema_errors(func, match):
    with pytest.raises(ChatTemplateError, match=match):
        get_json_schema(func)
    transformers_utils = pytest.importorskip("transformers.utils")
    with pytest.raises(Exception):
        transformers_utils.get_json_schema(func)


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------

HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['os'].system('echo pwned') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ open('/etc/passwd').read() }}",
    "{{ self._TemplateReference__context }}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ dict.__class__.__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ 'a' * 10 ** 12 }}",
    "{{ 'a'.ljust(10 ** 12) }}",
    "{{ 'a' | center(10 ** 12) }}",
    "{{ 'a' | indent(10 ** 12, true) }}",
    "{{ [1] | batch(10 ** 12, 0) | list }}",
    "{{ 7 ** 100000000 }}",
    "{% for i in range(10 ** 9) %}{% endfor %}",
    "{{ ('{0.__class__.__mro__}').format(messages) }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_are_refused(template):
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as e:
        render_chats([chat], template)
    assert "\n" not in str(e.value) and str(e.value).startswith("chat template")


def test_hostile_template_in_a_model_folder(folder, tmp_path):
    """A model whose chat_template.jinja walks to __subclasses__ loads (its template is only
    probed, in the sandbox), and every use of the template is refused in one line."""
    path = tmp_path / "hostile"
    path.mkdir()
    for f in folder.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    (path / "chat_template.jinja").write_text(HOSTILE[0] + "{% for m in messages %}{{ m.content }}{% endfor %}")
    tok = load_tokenizer(path)
    with pytest.raises(ChatTemplateError) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(e.value) == "chat template: access to attribute '__class__' of 'str' object is unsafe"


# ---------------------------------------------------------------------------------------------
# Refusals as the CLI and the server give them
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory):
    """A tiny model whose template is Gemma 2's, which refuses a system message."""
    from tinymodels import write_model

    path = write_model(tmp_path_factory.mktemp("gemma") / "tiny")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (Path(__file__).parent / "templates" / "google-gemma-2-2b-it.jinja").read_text()
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _mlxllama(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mlxllama", *args], capture_output=True, text=True, timeout=120)


def test_refusal_is_one_line_from_the_cli(gemma_model):
    r = _mlxllama("generate", "--model", str(gemma_model), "--system-prompt", "be brief", "-p", "hi",
                  "--max-tokens", "2")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: chat template: System role not supported", r.stderr


def test_cli_chat_template_config(gemma_model, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    for f in gemma_model.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if not allow %}{{ raise_exception('allow is off') }}{% endif %}"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    base = ("generate", "--model", str(path), "-p", "hi", "--max-tokens", "1")
    assert _mlxllama(*base).stderr.strip() == "error: chat template: allow is off"
    assert _mlxllama(*base, "--chat-template-config", '{"allow": true}').returncode == 0
    r = _mlxllama(*base, "--chat-template-config", "[1]")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --chat-template-config must be a JSON object")


def test_refusal_is_a_400_from_the_server(gemma_model):
    from starlette.testclient import TestClient

    import mlxllama
    from mlxllama.serve.app import create_app

    model, tokenizer = mlxllama.load(gemma_model)
    with TestClient(create_app(model, tokenizer, "tiny")) as client:
        bad = client.post("/v1/chat/completions", json={"messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "max_tokens": 2})
        assert bad.status_code == 400, bad.text
        assert "System role not supported" in bad.json()["error"]["message"]
        good = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2})
        assert good.status_code == 200, good.text
