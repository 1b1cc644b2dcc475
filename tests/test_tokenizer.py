"""mlxllama.tokenizer on tokenizers trained inside the tests: a byte-level BPE tokenizer.json and a
sentencepiece tokenizer.model with byte fallback. No network; a second or two in all."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxllama.errors import ChatTemplateError, ConfigError, InputError, ModelNotFoundError
from mlxllama.tokenizer import Tokenizer, load_tokenizer

ENGLISH = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "What is the answer? The answer is forty two.",
    "Streaming text should never break a character in two.",
    "hello hello world world the the and and is is",
]
CHINESE_AND_EMOJI = [
    "你好，世界！今天天气很好。",
    "我们在测试中文分词。",
    "emoji 🙂👍🏽🎉 and more 😀 smiles",
]
UNSEEN = "Hello world! 你好，世界。 Emoji: 🙂👍🏽🎉 naïve café — ünïcödé ∑ 🤖"

CHATML_TEMPLATE = """{% for message in messages %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if tools %}
<|im_start|>tools
{{ tools | tojson }}<|im_end|>
{% endif %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# Fixtures: tokenizers trained here
# ---------------------------------------------------------------------------------------------


def _train_byte_level_bpe():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((ENGLISH + CHINESE_AND_EMOJI) * 3, trainer)
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe")
    _train_byte_level_bpe().save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
        },
    )
    _write_json(path / "generation_config.json", {"eos_token_id": [0]})
    return path


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> Tokenizer:
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # as Llama's: no NFKC, so text round-trips exactly
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def sp(sp_dir) -> Tokenizer:
    return load_tokenizer(sp_dir)


@pytest.fixture(scope="module")
def sp_reference(sp_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = tokenizer.detokenizer
    pieces = []
    for token_id in ids:
        detok.add_token(token_id)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert detok.tokens == ids
    assert detok.text == "".join(pieces)
    return pieces


def _assert_clean(pieces: list[str]) -> None:
    for piece in pieces:
        assert "\ufffd" not in piece
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in piece)
        piece.encode("utf-8")  # a broken surrogate would raise here


def _splits_characters(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """Whether some token holds only part of a UTF-8 character (so the stream test means something)."""
    for token_id in ids:
        try:
            tokenizer.token_bytes(token_id).decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (tokenizer.json)
# ---------------------------------------------------------------------------------------------


def test_bpe_round_trip(bpe):
    for text in [UNSEEN, *ENGLISH, *CHINESE_AND_EMOJI, " leading and trailing spaces  ", ""]:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.vocab_size == len(bpe) == 400
    assert bpe.bos_token == "<|im_start|>" and bpe.bos_token_id == 1
    assert bpe.eos_token_id == 0 and bpe.pad_token_id == 0


def test_bpe_stream_matches_decode(bpe):
    ids = bpe.encode(UNSEEN)
    assert _splits_characters(bpe, ids)
    pieces = _stream(bpe, ids)
    _assert_clean(pieces)
    assert "".join(pieces) == bpe.decode(ids) == UNSEEN
    assert sum(1 for p in pieces if p) > 5  # it really streams


def test_bpe_stream_special_tokens_as_text(bpe):
    ids = bpe.apply_chat_template([{"role": "user", "content": "你好 🙂"}], tokenize=True)
    rendered = bpe.apply_chat_template([{"role": "user", "content": "你好 🙂"}], tokenize=False)
    assert "".join(_stream(bpe, ids)) == bpe.decode(ids) == rendered
    assert "<|im_end|>" in bpe.decode(ids) and "<|im_end|>" not in bpe.decode(ids, skip_special_tokens=True)


def test_bpe_stream_invalid_bytes_only_at_finalize(bpe):
    dragon = bpe.encode("龍")  # unseen in training: three single-byte tokens
    assert len(dragon) == 3
    detok = bpe.detokenizer
    detok.add_token(bpe.encode("a")[0])
    detok.add_token(dragon[0])
    detok.add_token(dragon[1])
    assert detok.last_segment == "a"
    detok.finalize()
    assert detok.last_segment == "\ufffd"
    assert detok.text == bpe.decode([bpe.encode("a")[0], *dragon[:2]])
    detok.reset()
    assert detok.text == "" and detok.tokens == []


def test_bpe_token_bytes_concatenate_to_decode(bpe):
    for text in [UNSEEN, *CHINESE_AND_EMOJI]:
        ids = bpe.encode(text)
        assert b"".join(bpe.token_bytes(i) for i in ids).decode("utf-8") == bpe.decode(ids)
    assert bpe.token_bytes(2) == b"<|im_end|>"


def test_bpe_chat_template(bpe):
    messages = [{"role": "user", "content": "Hi 你好"}]
    expected = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n"
    assert bpe.has_chat_template
    assert bpe.apply_chat_template(messages, tokenize=False) == expected
    assert bpe.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        expected + "<|im_start|>assistant\n"
    ids = bpe.apply_chat_template(messages)  # mlx-lm's defaults: token ids, no generation prompt
    assert ids[0] == bpe.bos_token_id and ids.count(bpe.bos_token_id) == 2
    assert bpe.decode(ids) == expected
    ids = bpe.apply_chat_template(messages, add_generation_prompt=True)
    assert bpe.decode(ids) == expected + "<|im_start|>assistant\n"


def test_bpe_chat_template_continue_final_message(bpe):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    rendered = bpe.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\nThe answer is")


def test_bpe_eos_ids(bpe, bpe_dir):
    im_end = 2
    assert bpe.eos_token_ids == {0, im_end}  # eos, plus the template's end-of-turn token
    assert load_tokenizer(bpe_dir, eos_token_ids=[7]).eos_token_ids == {0, im_end, 7}


def _variant(src: Path, dst: Path, config: dict, post_processor: bool) -> Path:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    dst.mkdir()
    tok = RustTokenizer.from_file(str(src / "tokenizer.json"))
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    tok.save(str(dst / "tokenizer.json"))
    _write_json(dst / "tokenizer_config.json", {"bos_token": "<|endoftext|>", **config})
    return dst


@pytest.mark.parametrize(
    "config, post_processor, adds_bos",
    [
        ({}, True, True),
        ({}, False, False),
        ({"add_bos_token": True}, False, True),
        ({"add_bos_token": False}, True, False),
    ],
)
def test_bos_rules(bpe_dir, tmp_path, config, post_processor, adds_bos):
    tok = load_tokenizer(_variant(bpe_dir, tmp_path / "t", config, post_processor))
    plain = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == ([0] if adds_bos else []) + plain
    assert tok.encode("<|endoftext|>hello") == [0] + plain  # never twice
    assert tok.encode("<|endoftext|><|endoftext|>hello") == [0, 0] + plain  # the text's own are kept
    assert tok.encode("hello", add_special_tokens=False) == plain


def _with_config(bpe_dir: Path, dst: Path, config: dict) -> Path:
    dst.mkdir()
    (dst / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    _write_json(dst / "tokenizer_config.json", config)
    return dst


def test_chat_template_features(bpe_dir, tmp_path):
    template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}"
        "{{ strftime_now('%Y') }}|{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% endfor %}|{{ extra }}"
    )
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": template}]
    tok = load_tokenizer(_with_config(bpe_dir, tmp_path / "a", {"chat_template": named}))
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], extra="x", tokenize=False)
    assert rendered[4:] == "|hi|x" and rendered[:4].isdigit()
    with pytest.raises(InputError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[], tokenize=False) == "tools"


def test_chat_template_files_and_errors(bpe_dir, tmp_path):
    path = _with_config(bpe_dir, tmp_path / "a", {"chat_template": "from config"})
    _write_json(path / "chat_template.json", {"chat_template": "from json"})
    hi = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(path).apply_chat_template(hi, tokenize=False) == "from json"
    (path / "chat_template.jinja").write_text("from jinja {% if %}")
    tok = load_tokenizer(path)  # a broken template does not stop loading ...
    with pytest.raises(ChatTemplateError, match="chat template does not parse"):  # ... only its use
        tok.apply_chat_template(hi)


# ---------------------------------------------------------------------------------------------
# Sentencepiece (tokenizer.model) with byte fallback
# ---------------------------------------------------------------------------------------------


def test_sp_defaults_from_model(sp):
    assert (sp.bos_token, sp.bos_token_id, sp.eos_token, sp.eos_token_id) == ("<s>", 1, "</s>", 2)
    assert sp.eos_token_ids == {2} and sp.pad_token_id is None
    assert len(sp) == sp.vocab_size


def test_sp_matches_sentencepiece(sp, sp_reference):
    for text in [UNSEEN, *ENGLISH, "Hello world"]:
        ids = sp.encode(text, add_special_tokens=False)
        assert ids == sp_reference.encode(text)
        assert sp.decode(ids) == sp_reference.decode(ids) == text


def test_sp_byte_fallback_stream(sp):
    ids = sp.encode(UNSEEN, add_special_tokens=False)
    assert _splits_characters(sp, ids)
    pieces = _stream(sp, ids)
    _assert_clean(pieces)
    assert "".join(pieces) == sp.decode(ids) == UNSEEN


def test_sp_word_initial_spaces(sp):
    ids = sp.encode("Hello world", add_special_tokens=False)
    pieces = _stream(sp, ids)
    assert "".join(pieces) == "Hello world"
    assert not next(p for p in pieces if p).startswith(" ")
    assert "".join(_stream(sp, sp.encode("  two  spaces", add_special_tokens=False))) == "  two  spaces"


def test_sp_token_bytes_concatenate_to_decode(sp):
    ids = sp.encode(UNSEEN, add_special_tokens=False)
    assert b"".join(sp.token_bytes(i) for i in ids).decode("utf-8") == " " + sp.decode(ids)
    assert sp.token_bytes(sp.encode("中", add_special_tokens=False)[-1]) == "中".encode()[-1:]


def test_sp_bos_and_special_tokens(sp):
    plain = sp.encode("Hello world", add_special_tokens=False)
    assert sp.encode("Hello world") == [1] + plain
    assert sp.encode("<s>Hello world") == [1] + plain  # found in text, not added twice
    assert sp.encode("Hello world</s>", add_special_tokens=False) == plain + [2]
    assert sp.decode([1] + plain + [2]) == "<s> Hello world</s>"
    assert sp.decode([1] + plain + [2], skip_special_tokens=True) == "Hello world"
    assert "".join(_stream(sp, [1] + plain)) == sp.decode([1] + plain)


def test_sp_without_template_falls_back_to_plain_lines(sp):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert not sp.has_chat_template
    assert sp.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        "system: Be brief.\nuser: Hi\nassistant:"
    assert sp.apply_chat_template(messages, add_generation_prompt=True) == sp.encode(
        "system: Be brief.\nuser: Hi\nassistant:", add_special_tokens=False
    )


def test_sp_config_files(sp_dir, tmp_path):
    path = tmp_path / "sp"
    path.mkdir()
    (path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    _write_json(path / "tokenizer_config.json", {"add_bos_token": False, "eos_token": {"content": "</s>"}})
    _write_json(path / "generation_config.json", {"eos_token_id": [2, 5]})
    _write_json(path / "config.json", {"eos_token_id": 6})
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    )
    tok = load_tokenizer(path)
    assert tok.eos_token_ids == {2, 5, 6}
    assert tok.encode("Hello")[:1] != [1]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x</s>"


# ---------------------------------------------------------------------------------------------
# Sentencepiece-style tokenizer.json (Llama 2 / Mistral layout: byte fallback, "▁" spaces)
# ---------------------------------------------------------------------------------------------


def _llama_style_tokenizer_json(sp_reference, decoder: str):
    """A tokenizer.json over the sentencepiece vocabulary, laid out as Hugging Face converts
    Llama models: Unigram with byte fallback, a "▁" prefix, BOS from the post-processor."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import Unigram

    size = sp_reference.get_piece_size()
    vocab = [(sp_reference.id_to_piece(i), sp_reference.get_score(i)) for i in range(size)]
    tok = RustTokenizer(Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    first = decoders.Metaspace(prepend_scheme="first") if decoder == "metaspace" else decoders.Replace("▁", " ")
    tail = [] if decoder == "metaspace" else [decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence([first, decoders.ByteFallback(), decoders.Fuse(), *tail])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tok


@pytest.mark.parametrize("decoder", ["strip", "metaspace"])
def test_sentencepiece_style_tokenizer_json(sp_reference, tmp_path, decoder):
    _llama_style_tokenizer_json(sp_reference, decoder).save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(UNSEEN)
    assert ids[0] == 1 and ids.count(1) == 1 and tok.encode("<s>" + UNSEEN) == ids
    body = ids[1:]
    assert _splits_characters(tok, body)
    assert tok.decode(body) == UNSEEN and tok.decode(ids, skip_special_tokens=True) == UNSEEN
    for seq in (body, ids, [*body, 2]):
        pieces = _stream(tok, seq)
        _assert_clean(pieces)
        assert "".join(pieces) == tok.decode(seq)
    assert b"".join(tok.token_bytes(i) for i in body).decode("utf-8") == " " + UNSEEN
    assert "".join(_stream(tok, tok.encode("Hello world", add_special_tokens=False))) == "Hello world"


# ---------------------------------------------------------------------------------------------
# Errors and import cost
# ---------------------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"])
def test_unreadable_files(tmp_path, sp_dir, name):
    if name == "tokenizer_config.json":
        (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / name).write_text("{ not a tokenizer")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_tokenizer(tmp_path)


def test_import_does_not_pull_transformers():
    code = "import sys, mlxllama.tokenizer; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Parity with transformers (reference only)
# ---------------------------------------------------------------------------------------------


def test_bpe_parity_with_transformers(bpe, bpe_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    for text in [UNSEEN, *ENGLISH, "<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_start|>user"]:
        assert bpe.encode(text) == hf.encode(text)
        assert bpe.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    tools = [{"type": "function", "function": {"name": "天气", "parameters": {"city": "<Paris & Co>"}}}]
    chats = [
        [{"role": "user", "content": "Hi 你好"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."},
        ],
    ]
    for messages in chats:
        for gen in (True, False):
            ours = bpe.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            with_tools = hf.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False)
            assert bpe.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False) == with_tools
            assert bpe.encode(ours, add_special_tokens=False) == hf.encode(ours, add_special_tokens=False)
