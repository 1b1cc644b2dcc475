"""Tokenizers for model folders: tokenizer.json or tokenizer.model, chat templates, streaming text.

`load_tokenizer(model_dir)` reads the files a Hugging Face / mlx-lm model folder carries:

- ``tokenizer.json`` (preferred, read with the ``tokenizers`` library) or ``tokenizer.model``
  (a sentencepiece model, read with ``sentencepiece``);
- ``tokenizer_config.json`` and ``special_tokens_map.json`` for the BOS/EOS/PAD tokens,
  ``add_bos_token`` and the chat template; ``chat_template.jinja`` (plus named templates in
  ``additional_chat_templates/``) / ``chat_template.json`` win over ``tokenizer_config.json``;
- ``generation_config.json`` and ``config.json`` for more stop ids.

Chat templates render exactly as transformers renders them (see `mlxllama.chat_template`), and
`Tokenizer.apply_chat_template` takes transformers' arguments with mlx-lm's defaults (token ids,
no generation prompt unless asked). A model without a template falls back to plain lines,
``"{role}: {content}\\n"`` per message and ``"assistant:"`` as the generation prompt.

Text is bytes underneath: `Tokenizer.token_bytes` gives the exact bytes each token contributes,
and `StreamingDetokenizer` turns a token stream into text in O(1) per token by feeding those bytes
through an incremental UTF-8 decoder, so a character split across tokens is held back until it
is complete.

Known simplifications: ``clean_up_tokenization_spaces`` is not applied (decode keeps the spaces
the tokens carry, as streaming must); sentencepiece text next to special tokens is encoded the
"legacy" Hugging Face way (each piece of text gets the dummy-prefix space); decoders other than
byte-level BPE and sentencepiece-style (e.g. WordPiece) get per-token approximations in
`token_bytes` and streaming.

Importing this module is cheap: ``tokenizers``, ``sentencepiece`` and ``jinja2`` are imported
when first needed, and ``transformers`` never.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .batch_encoding import shape_batch, span_mask
from .chat_template import render_chats, render_plain, select_template
from .errors import ChatTemplateError, ConfigError, InputError, MlxllamaError, ModelNotFoundError

SPACE_SYMBOL = "\u2581"  # "▁", sentencepiece's visible space
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_PROBE_USER = "MLXLLAMA-PROBE-USER"
_PROBE_ASSISTANT = "MLXLLAMA-PROBE-ASSISTANT"


# ---------------------------------------------------------------------------------------------
# Small helpers: files, token fields, byte maps
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file does not exist; ConfigError when it is broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read {path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special-token field: a string, {"content": ...} (an AddedToken dump) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    """An eos_token_id field: an int, a list of ints or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in _gpt2_bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    """Bytes of a byte-level BPE token; like the `tokenizers` ByteLevel decoder, a token with a
    character outside the byte map (an added token such as "日本") stands for its own UTF-8."""
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece_bytes(piece: str, byte_fallback: bool, space: str = SPACE_SYMBOL) -> bytes:
    """Bytes of a sentencepiece-style piece: '▁' is a space, '<0xAB>' is the byte 0xAB."""
    if byte_fallback:
        match = _BYTE_PIECE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    return piece.replace(space, " ").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Backends: the two file formats behind one small interface
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DecoderStyle:
    """What a tokenizer.json decoder does, as far as token bytes are concerned."""

    kind: str  # "byte_level", "sentencepiece" or "other"
    strips_leading_space: bool = False
    byte_fallback: bool = False
    space: str = SPACE_SYMBOL


def _flatten_decoders(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for child in decoder.get("decoders", []) for d in _flatten_decoders(child)]
    return [decoder]


def _decoder_style(decoder: dict[str, Any] | None) -> _DecoderStyle:
    """Classifies a tokenizer.json "decoder" section."""
    parts = _flatten_decoders(decoder)
    types = {d.get("type") for d in parts}
    if "ByteLevel" in types:
        return _DecoderStyle("byte_level")
    metaspace = next((d for d in parts if d.get("type") == "Metaspace"), None)
    replaces_space = any(
        d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == SPACE_SYMBOL for d in parts
    )
    if metaspace is None and not replaces_space and "ByteFallback" not in types:
        return _DecoderStyle("other")
    strip = any(d.get("type") == "Strip" and d.get("content") == " " and d.get("start", 0) > 0 for d in parts)
    if metaspace is not None:
        scheme = metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space", True) else "never")
        strip = strip or scheme in ("always", "first")
    space = (metaspace or {}).get("replacement", SPACE_SYMBOL)
    return _DecoderStyle("sentencepiece", strip, "ByteFallback" in types, space)


class _TokenizersBackend:
    """A tokenizer.json, through the `tokenizers` library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for bad files
            raise ConfigError(f"cannot read tokenizer file {path}: {e}") from None
        decoder = self._tok.decoder
        self.style = _decoder_style(json.loads(decoder.__getstate__()) if decoder is not None else None)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=False)
        self.length: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.strips_leading_space = self.style.strips_leading_space

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, int]]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).offsets)

    def token_bytes(self, token_id: int) -> bytes:
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if self.style.kind == "byte_level":
            return _byte_level_bytes(token)
        if self.style.kind == "sentencepiece":
            return _sentencepiece_bytes(token, self.style.byte_fallback, self.style.space)
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


class _SentencePieceBackend:
    """A tokenizer.model, through `sentencepiece`, plus tokens added in tokenizer_config.json.

    Control pieces (<s>, </s>) and <unk> are special: encode finds them in text (as Hugging Face
    does, so rendered chat templates tokenize right) and decode writes them as their text."""

    def __init__(self, path: Path, added_tokens: dict[int, tuple[str, bool]]) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"cannot read tokenizer file {path}: {e}") from None
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self._added = {i: text for i, (text, _) in added_tokens.items() if i >= self.vocab_size}
        self.length: int = max([self.vocab_size - 1, *self._added]) + 1
        self.special_tokens: dict[str, int] = {
            sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)
        }
        self.special_tokens.update({text: i for i, (text, special) in added_tokens.items() if special})
        self._special_ids = set(self.special_tokens.values())
        self._splitter = self._make_splitter([*self.special_tokens, *self._added.values()])
        self.strips_leading_space = sp.normalize("a").startswith(SPACE_SYMBOL)

    @staticmethod
    def _make_splitter(tokens: list[str]) -> re.Pattern[str] | None:
        tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Ids of `text`; BOS is the caller's business (sentencepiece adds none)."""
        segments = self._splitter.split(text) if self._splitter else [text]
        ids: list[int] = []
        for i, segment in enumerate(segments):
            if i % 2:  # a captured special or added token
                ids.append(self.token_to_id(segment))  # type: ignore[arg-type]
            elif segment:
                ids.extend(self._sp.encode(segment))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        data = b"".join(self.token_bytes(i) for i in ids)
        if self.strips_leading_space and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        for i, text in self._added.items():
            if text == token:
                return i
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        if not 0 <= token_id < self.vocab_size:
            return b""
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return _sentencepiece_bytes(piece, byte_fallback=True)
        if token_id in self._special_ids:
            return piece.encode("utf-8")
        return _sentencepiece_bytes(piece, byte_fallback=False)

    def default_token(self, name: str) -> str | None:
        """The sentencepiece model's own bos/eos/pad/unk piece, if it has one."""
        getters = {"bos": self._sp.bos_id, "eos": self._sp.eos_id, "pad": self._sp.pad_id, "unk": self._sp.unk_id}
        token_id = getters[name]()
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None


_Backend = _TokenizersBackend | _SentencePieceBackend


# ---------------------------------------------------------------------------------------------
# Chat template files
# ---------------------------------------------------------------------------------------------


def _named_templates(value: Any) -> str | dict[str, str] | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (a dict then)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        named = {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
        return named or None
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _load_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | dict[str, str] | None:
    """As transformers loads them: chat_template.jinja is the default, additional_chat_templates/
    adds named ones; without the file, chat_template.json, then tokenizer_config.json."""
    templates: dict[str, str] = {}
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = _read_text(jinja_file)
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    from_json = _named_templates(_read_json(model_dir / "chat_template.json").get("chat_template"))
    return from_json or _named_templates(tokenizer_config.get("chat_template"))


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------


class StreamingDetokenizer:
    """Turns token ids into text as they arrive, one token at a time.

    Tokens are turned into bytes (`Tokenizer.token_bytes`) and fed to an incremental UTF-8
    decoder, so each token costs O(1) and a character split across tokens is only emitted once
    complete. Bytes that can never form a character become U+FFFD as soon as that is certain;
    an incomplete character at the very end becomes U+FFFD in `finalize`. The result equals
    `Tokenizer.decode(tokens)` (special tokens appear as their text)."""

    def __init__(self, token_bytes: Callable[[int], bytes], strips_leading_space: bool = False) -> None:
        self._token_bytes = token_bytes
        self._strips_leading_space = strips_leading_space
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tokens: list[int] = []
        self._chunks: list[str] = []  # all text so far, in pieces (joined lazily by `text`)
        self._unread: list[str] = []  # text not yet returned by `last_segment`
        self._seen_bytes = False

    def add_token(self, token_id: int) -> None:
        self._tokens.append(token_id)
        data = self._token_bytes(token_id)
        if data and not self._seen_bytes:
            self._seen_bytes = True
            if self._strips_leading_space and data.startswith(b" "):
                data = data[1:]  # sentencepiece's dummy-prefix space at the start of a text
        self._push(self._decoder.decode(data))

    def finalize(self) -> None:
        self._push(self._decoder.decode(b"", final=True))

    def _push(self, piece: str) -> None:
        if piece:
            self._chunks.append(piece)
            self._unread.append(piece)

    @property
    def last_segment(self) -> str:
        """The text completed since the previous call."""
        segment = "".join(self._unread)
        self._unread.clear()
        return segment

    @property
    def text(self) -> str:
        """All complete text so far."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def tokens(self) -> list[int]:
        return self._tokens


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode, decode, chat templates and streaming for one model folder (see `load_tokenizer`)."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str | None],
        add_bos_token: bool | None,
        chat_template: str | dict[str, str] | None,
        extra_eos_ids: list[int],
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        self._backend = backend
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self._add_bos_token = add_bos_token
        self._bytes_cache: dict[int, bytes] = {}
        self.vocab_size: int = backend.vocab_size
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.bos_token_id: int | None = self._id_of(self.bos_token)
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.pad_token: str | None = special_tokens.get("pad_token")
        self.pad_token_id: int | None = self._id_of(self.pad_token)
        self.chat_template: str | dict[str, str] | None = chat_template  # a dict: named templates
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self._backend_adds_bos = self.bos_token_id is not None and isinstance(self._backend, _TokenizersBackend) \
            and self._backend.encode("", True)[:1] == [self.bos_token_id]
        primary = self._id_of(self.eos_token)
        self.eos_token_id: int | None = primary if primary is not None else next(iter(extra_eos_ids), None)
        self.eos_token_ids: set[int] = {i for i in [primary, *extra_eos_ids] if i is not None}
        end_of_turn = self._end_of_turn_id()
        if end_of_turn is not None:
            self.eos_token_ids.add(end_of_turn)

    def __repr__(self) -> str:
        kind = type(self._backend).__name__.strip("_").replace("Backend", "")
        return f"Tokenizer({kind}, vocab={len(self)}, bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)})"

    def __len__(self) -> int:
        return self._backend.length

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _id_of(self, token: str | None) -> int | None:
        return self._backend.token_to_id(token) if token else None

    # -- ids <-> text ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, BOS is added as the tokenizer config
        says (add_bos_token, else the tokenizer.json post-processor, else on for sentencepiece
        models with a BOS), but not when `text` already begins with one."""
        ids = list(self._backend.encode(text, add_special_tokens))
        if add_special_tokens and self.bos_token_id is not None:
            ids = self._with_one_bos(ids, text)
        return ids

    def _with_one_bos(self, ids: list[int], text: str) -> list[int]:
        """BOS decided here, once: a BOS the post-processor added is taken off, then one is put
        back when the config asks for it and the text does not begin with one already. A BOS
        the text itself holds (even twice) is never removed."""
        bos = self.bos_token_id
        if self._backend_adds_bos and ids[:1] == [bos]:
            ids = ids[1:]
        add = self._add_bos_token
        if add is None:
            add = self._backend_adds_bos or isinstance(self._backend, _SentencePieceBackend)
        if add and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` contributes to decoded text (special tokens: their UTF-8 text).
        Concatenated and decoded, they give `decode` (sentencepiece: minus the leading space)."""
        data = self._bytes_cache.get(token_id)
        if data is None:
            data = self._bytes_cache[token_id] = self._backend.token_bytes(token_id)
        return data

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer."""
        return StreamingDetokenizer(self.token_bytes, self._backend.strips_leading_space)

    # -- chat ----------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str | None:
        """The template `apply_chat_template` uses: `chat_template` (one of the model's template
        names, or a template string), else the model's `tool_use` template when tools are
        given and it has one, else its default. None: the model has no template."""
        return select_template(self.chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[Any] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Renders a conversation (a list of messages) or a batch of them with the chat template,
        as transformers does; extra keyword arguments (enable_thinking, ...) are template variables.

        Defaults as mlx-lm's tokenizer: token ids (tokenize=True), no generation prompt unless
        add_generation_prompt=True, a plain list unless return_dict / return_tensors ("np",
        "mlx", "pt") ask for more. tokenize=False gives the text. Without any template: one
        "role: content" line per message and "assistant:" as the generation prompt.
        return_assistant_tokens_mask adds "assistant_masks": 1 for the tokens of the template's
        {% generation %} blocks."""
        if kwargs.pop("sanitize_control_tokens", False):
            raise InputError("apply_chat_template: sanitize_control_tokens is not supported")
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ChatTemplateError("return_assistant_tokens_mask=True needs return_dict=True and tokenize=True")
        if return_assistant_tokens_mask and continue_final_message:
            raise ChatTemplateError("continue_final_message is not compatible with return_assistant_tokens_mask")
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation: give at least one message")
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        conversations = list(conversation) if batched else [conversation]
        template = self.get_chat_template(chat_template, tools)
        spans: list[list[tuple[int, int]]] | None = [] if return_assistant_tokens_mask else None
        if template is None:
            rendered = [render_plain(c, add_generation_prompt, continue_final_message) for c in conversations]
            spans = [[] for _ in rendered] if spans is not None else None
        else:
            rendered = render_chats(conversations, template, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    variables={**self._special_tokens, **kwargs}, generation_spans=spans)
        if not tokenize:
            return rendered if batched else rendered[0]
        add_special = bool((tokenizer_kwargs or {}).get("add_special_tokens", False))
        ids = [self.encode(text, add_special_tokens=add_special) for text in rendered]
        masks = None
        if spans is not None:
            masks = [span_mask(self._offsets(text, add_special, len(row)), s)
                     for text, row, s in zip(rendered, ids, spans)]
        out = shape_batch(ids, masks, pad_id=self.pad_token_id, padding=padding, truncation=truncation,
                          max_length=max_length, return_tensors=return_tensors, batched=batched,
                          padding_side=self.padding_side, truncation_side=self.truncation_side)
        return out if return_dict else out["input_ids"]

    def _offsets(self, text: str, add_special_tokens: bool, n: int) -> list[tuple[int, int]]:
        """(start, end) characters of each of the n tokens `encode(text)` gives."""
        if not isinstance(self._backend, _TokenizersBackend):
            raise InputError("return_assistant_tokens_mask needs a tokenizer.json (token offsets)")
        offsets = self._backend.offsets(text, add_special_tokens)
        if len(offsets) >= n:  # encode took a BOS off the front (or nothing changed)
            return offsets[len(offsets) - n:]
        return [(0, 0)] * (n - len(offsets)) + offsets  # encode put a BOS in front

    def _end_of_turn_id(self) -> int | None:
        """The special token the chat template writes right after an assistant message
        (<|im_end|>, <|eot_id|>, <end_of_turn>, ...), found by rendering a probe chat."""
        if self.chat_template is None:
            return None
        probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        try:
            rendered = self.apply_chat_template(probe, tokenize=False)
        except MlxllamaError:  # a template that rejects the probe: no end-of-turn token then
            return None
        index = rendered.find(_PROBE_ASSISTANT)
        if index < 0:
            return None
        rest = rendered[index + len(_PROBE_ASSISTANT):].lstrip()
        matches = [t for t in self._backend.special_tokens if rest.startswith(t)]
        return self._backend.special_tokens[max(matches, key=len)] if matches else None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SENTENCEPIECE_DEFAULTS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _added_tokens(tokenizer_config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """tokenizer_config's added_tokens_decoder: {id: (content, special)}."""
    added: dict[int, tuple[str, bool]] = {}
    for key, value in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        content = _token_text(value)
        if content is not None and str(key).isdigit():
            added[int(key)] = (content, bool(value.get("special", True)) if isinstance(value, dict) else True)
    return added


def _special_tokens(backend: _Backend, *configs: dict[str, Any]) -> dict[str, str | None]:
    """Special-token strings (bos, eos, unk, sep, pad, cls, mask): the first config that names the field wins (null included);
    a sentencepiece model supplies its own when no config does."""
    tokens: dict[str, str | None] = {}
    for name in _SPECIAL_NAMES:
        config = next((c for c in configs if name in c), None)
        if config is not None:
            tokens[name] = _token_text(config[name])
        elif isinstance(backend, _SentencePieceBackend) and name in _SENTENCEPIECE_DEFAULTS:
            tokens[name] = backend.default_token(name.removesuffix("_token"))
        else:
            tokens[name] = None
    return tokens


def _open_backend(model_dir: Path, tokenizer_config: dict[str, Any]) -> _Backend:
    if (model_dir / "tokenizer.json").is_file():
        return _TokenizersBackend(model_dir / "tokenizer.json")
    if (model_dir / "tokenizer.model").is_file():
        return _SentencePieceBackend(model_dir / "tokenizer.model", _added_tokens(tokenizer_config))
    raise ModelNotFoundError(f"no tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model")


def load_tokenizer(model_dir: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
    """The tokenizer of a model folder. `eos_token_ids` adds stop ids to those the folder's
    tokenizer_config.json, generation_config.json, config.json and chat template give."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model folder not found: {model_dir}")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    backend = _open_backend(model_dir, tokenizer_config)
    special = _special_tokens(backend, tokenizer_config, _read_json(model_dir / "special_tokens_map.json"))
    extra_eos = [
        *(eos_token_ids or []),
        *_id_list(_read_json(model_dir / "generation_config.json").get("eos_token_id")),
        *_id_list(_read_json(model_dir / "config.json").get("eos_token_id")),
    ]
    add_bos = tokenizer_config.get("add_bos_token")
    sides = {k: tokenizer_config[k] for k in ("padding_side", "truncation_side")
             if tokenizer_config.get(k) in ("left", "right")}
    return Tokenizer(
        backend,
        special_tokens=special,
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        chat_template=_load_chat_template(model_dir, tokenizer_config),
        extra_eos_ids=extra_eos,
        **sides,
    )
