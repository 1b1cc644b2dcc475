"""An MLX model folder's tokenizer as GGUF `tokenizer.ggml.*` metadata (the inverse of gguf_tokenizer.py).

- byte-level BPE (tokenizer.json): "gpt2" with the vocabulary, merges and a pre-tokenizer name that
  llama.cpp knows (smollm, llama-bpe, qwen2 or gpt-2, read from the pre-tokenizer's shape);
- a sentencepiece tokenizer.model: "llama" with its pieces, scores and token types; without one, a
  sentencepiece-style BPE tokenizer.json (byte fallback) as "llama" with scores that rank its merges.
Special added tokens become control tokens, other added tokens user-defined ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxllama.errors import UnsupportedModelError

from .gguf_tokenizer import _LLAMA3, _QWEN2, BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"cannot read {path}: {e}") from None


def _pre_name(pre: dict | None) -> str:
    text = json.dumps(pre or {})
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if json.dumps(_LLAMA3)[1:-1] in text:
        return "llama-bpe"
    if json.dumps(_QWEN2)[1:-1] in text:
        return "qwen2"
    return "gpt-2"


def _token_text(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def chat_template(folder: Path, tok_config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = _read(folder / "chat_template.json").get("chat_template") or tok_config.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def _gpt2(spec: dict) -> dict:
    model = spec["model"]
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    n = max([*vocab.values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for i, a in added.items():
        tokens[i], types[i] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": _pre_name(spec.get("pre_tokenizer")), "tokens": tokens, "types": types,
            "merges": merges}


def _spm_from_json(spec: dict) -> dict:
    """A sentencepiece-style BPE tokenizer.json (byte fallback, Metaspace): scores rank the merges."""
    vocab, n_merges = _gpt2(spec), len(spec["model"].get("merges", []))
    tokens, types, merges = vocab["tokens"], vocab["types"], vocab["merges"]
    scores = [-float(n_merges + i) for i in range(len(tokens))]
    index = {t: i for i, t in enumerate(tokens)}
    for rank, m in enumerate(merges):
        merged = index.get(m.replace(" ", "", 1) if " " in m else m)
        if merged is not None and scores[merged] < -n_merges:
            scores[merged] = -float(rank)
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
    unk = spec["model"].get("unk_token")
    if unk in index:
        types[index[unk]] = UNKNOWN
    prefix = '"prepend_scheme": "never"' not in json.dumps(spec.get("pre_tokenizer"))
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "add_space_prefix": prefix}


def _sentencepiece(path: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)], "types": types,
            "scores": [sp.get_score(i) for i in range(n)]}


def vocab_metadata(folder: Path, config: dict) -> dict:
    """{'model', 'tokens', 'types', optional 'pre', 'merges', 'scores', token ids, 'add_bos', 'chat_template'}."""
    folder = Path(folder)
    spec = _read(folder / "tokenizer.json")
    tok_config = _read(folder / "tokenizer_config.json")
    model = spec.get("model", {})
    if (folder / "tokenizer.model").is_file() and model.get("byte_fallback", True):
        vocab = _sentencepiece(folder / "tokenizer.model")
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = _spm_from_json(spec)
    elif model.get("type") == "BPE" and not model.get("byte_fallback") and "ByteLevel" in json.dumps(spec):
        vocab = _gpt2(spec)
    else:
        raise UnsupportedModelError(f"{folder}: only BPE tokenizers (byte-level, or sentencepiece-style with "
                                    "byte fallback) can be written to GGUF")
    index = {t: i for i, t in enumerate(vocab["tokens"])}
    gen = _read(folder / "generation_config.json")
    for key in ("bos", "eos", "pad", "unk"):
        tid = index.get(_token_text(tok_config.get(f"{key}_token")))
        if tid is None:
            v = gen.get(f"{key}_token_id", config.get(f"{key}_token_id"))
            tid = v[0] if isinstance(v, list) and v else v
        if isinstance(tid, int) and 0 <= tid < len(vocab["tokens"]):
            vocab[f"{key}_id"] = tid
    vocab["add_bos"] = bool(tok_config.get("add_bos_token", vocab["model"] == "llama"))
    vocab["chat_template"] = chat_template(folder, tok_config)
    return vocab


def add_vocab(writer, vocab: dict) -> None:
    """Write the vocabulary into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("pad_id", writer.add_pad_token_id), ("unk_id", writer.add_unk_token_id)):
        if key in vocab:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
