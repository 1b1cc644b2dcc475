"""Rebuild Hugging Face tokenizer files from a GGUF file's `tokenizer.ggml.*` metadata.

- "gpt2": byte-level BPE over the vocabulary and merges; the pre-tokenizer follows
  `tokenizer.ggml.pre` (smollm: split digits, then byte-level; llama-bpe / qwen2: their split regex).
- "llama": sentencepiece BPE vocabulary with scores; rebuilt as BPE with byte fallback whose merges
  are ranked by the score of the merged piece (what transformers' LlamaConverter does), with a
  Metaspace pre-tokenizer and the sentencepiece-style decoder.
Control tokens (token_type 3) become special added tokens; user-defined ones (4) added tokens.
"""

from __future__ import annotations

import json
import warnings

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mlxllama.errors import MlxllamaError, UnsupportedModelError

from .gguf_config import meta_int, meta_list, meta_str, scalar

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _flag(md: dict, key: str, path, default: bool) -> bool:
    v = scalar(md, key, default)
    if not isinstance(v, (bool, int)):
        raise UnsupportedModelError(f"{path}: GGUF metadata {key} must be a boolean")
    return bool(v)


def _byte_level_pre_tokenizer(pre: str):
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        regex = _LLAMA3
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        regex = _QWEN2
    else:
        if pre not in ("gpt-2", "default", "gpt2"):
            warnings.warn(f"GGUF pre-tokenizer '{pre}' is not known here; using GPT-2's byte-level split")
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE vocabulary: every split of a piece into two pieces, by piece score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges = []
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((l, r, float(scores[i])) for l, r in local)
    merges.sort(key=lambda m: -m[2])  # stable: ties keep vocabulary order
    return [(l, r) for l, r, _ in merges]


def _model(md, path, kind, tokens, vocab, types, unk):
    """(tokenizer with its model, decoder and pre-tokenizer, whether BOS is added by default, post-processor)."""
    n = len(tokens)
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta_list(md, "tokenizer.ggml.merges", path, "str") or []]
        if any(len(m) != 2 for m in merges):
            raise UnsupportedModelError(f"{path}: a GGUF tokenizer merge is not two tokens separated by a space")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(meta_str(md, "tokenizer.ggml.pre", path, "default"))
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
        tail = processors.ByteLevel(trim_offsets=False)
    elif kind == "llama":
        scores = meta_list(md, "tokenizer.ggml.scores", path, "num", n)
        scores = scores.tolist() if scores is not None else [0.0] * n
        unk_token = tokens[unk] if unk is not None else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk_token,
                                   fuse_unk=True, byte_fallback=True))
        prefix = _flag(md, "tokenizer.ggml.add_space_prefix", path, True)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        add_bos_default = True
        tail = None
    else:
        raise UnsupportedModelError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    return tok, add_bos_default, tail


def build_tokenizer(md: dict, path="GGUF file") -> tuple[Tokenizer, dict]:
    """(tokenizers.Tokenizer, tokenizer_config dict) from GGUF metadata; path names the file in errors."""
    kind = meta_str(md, "tokenizer.ggml.model", path)
    tokens = meta_list(md, "tokenizer.ggml.tokens", path, "str")
    if kind is None or not tokens:
        raise UnsupportedModelError(f"{path} has no tokenizer (tokenizer.ggml.model / tokens missing)")
    n = len(tokens)
    types = meta_list(md, "tokenizer.ggml.token_type", path, "num", n)
    types = [int(t) for t in types.tolist()] if types is not None else [NORMAL] * n
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:
        raise UnsupportedModelError(f"{path}: the GGUF tokenizer has duplicate tokens")

    def token_id(key):
        v = meta_int(md, f"tokenizer.ggml.{key}_token_id", path, low=-2**63)
        return None if v is None or not 0 <= v < n else v

    bos, eos, unk, pad = token_id("bos"), token_id("eos"), token_id("unknown"), token_id("padding")
    try:
        tok, add_bos_default, tail = _model(md, path, kind, tokens, vocab, types, unk)
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad vocabularies
        if isinstance(e, MlxllamaError):
            raise
        raise UnsupportedModelError(f"{path}: the GGUF tokenizer cannot be built: "
                                    f"{' '.join(str(e).split())[:200]}") from None

    special = [AddedToken(tokens[i], special=True, normalized=False) for i in range(n)
               if types[i] in (CONTROL, UNKNOWN) and tokens[i]]
    tok.add_special_tokens(special)
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in range(n) if types[i] == USER_DEFINED]
    if user:
        tok.add_tokens(user)

    add_bos = _flag(md, "tokenizer.ggml.add_bos_token", path, add_bos_default)
    add_eos = _flag(md, "tokenizer.ggml.add_eos_token", path, False)
    single, pair, specials = "$A", "$A $B", []
    if add_bos and bos is not None:
        single, pair = f"{tokens[bos]}:0 {single}", f"{tokens[bos]}:0 $A {tokens[bos]}:1 $B:1"
        specials.append((tokens[bos], bos))
    if add_eos and eos is not None:
        single, pair = f"{single} {tokens[eos]}:0", f"{pair} {tokens[eos]}:1"
        specials.append((tokens[eos], eos))
    if specials:
        template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict(specials).items()))
        tok.post_processor = processors.Sequence([tail, template]) if tail else template
    elif tail is not None:
        tok.post_processor = tail

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta_int(md, f"{meta_str(md, 'general.architecture', path, 'llama')}.context_length",
                                     path, 2048),
    }
    for key, idx in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if idx is not None:
            config[key] = tokens[idx]
    template = meta_str(md, "tokenizer.chat_template", path)
    if template:
        config["chat_template"] = template
    return tok, config


def write_tokenizer_files(md: dict, folder, path="GGUF file") -> dict:
    """Write tokenizer.json and tokenizer_config.json into folder; return the tokenizer config."""
    tok, config = build_tokenizer(md, path)
    tok.save(str(folder / "tokenizer.json"))
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return config
