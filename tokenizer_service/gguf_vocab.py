"""Build an HF `tokenizers.Tokenizer` from the vocabulary embedded in a GGUF file.

A GGUF carries no tokenizer.json, only llama.cpp's metadata: the token strings, their types,
scores (sentencepiece) or merges (BPE), special ids and the name of the pre-tokenizer. We rebuild
the tokenizer the same way transformers' GGUF loader does, so both encode text identically:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE; the split regex comes from
  `tokenizer.ggml.pre` (GPT-2's regex when the name is not one we know).
* `tokenizer.ggml.model == "llama"`: sentencepiece-style BPE with byte-fallback tokens
  (`<0x0A>`), metaspace (`▁`) for spaces and merges recovered from the token scores when the
  file has none.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from kuiper_serve.common.gguf import read_gguf_metadata

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> split regex (the names llama.cpp's converter writes).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@dataclass
class GGUFVocab:
    """The tokenizer metadata of one GGUF file."""

    model: str  # tokenizer.ggml.model: "gpt2", "llama", ...
    pre: str | None
    tokens: list[str]
    token_types: list[int] | None
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    architecture: str | None


def _read_metadata_with_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # imported here: only GGUF models need it

    reader = GGUFReader(path, "r")
    return {key: field.contents() for key, field in reader.fields.items()}


def read_gguf_vocab(path: Path) -> GGUFVocab:
    """Read the tokenizer metadata of a GGUF file."""
    try:
        metadata = read_gguf_metadata(path)
    except (ValueError, struct.error, OSError):  # GGUFError is a ValueError
        try:  # big-endian or older files: the gguf library knows them all
            metadata = _read_metadata_with_gguf(path)
        except Exception as exc:  # the library raises ValueError/struct errors on bad files
            raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(key, default)

    model = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(f"{path} has no embedded vocabulary (no tokenizer.ggml.* metadata)")
    # llama.cpp adds BOS for sentencepiece vocabularies unless the file says otherwise.
    add_bos = get("tokenizer.ggml.add_bos_token", model == "llama")
    return GGUFVocab(
        model=model,
        pre=get("tokenizer.ggml.pre"),
        tokens=list(tokens),
        token_types=get("tokenizer.ggml.token_type"),
        scores=get("tokenizer.ggml.scores"),
        merges=get("tokenizer.ggml.merges"),
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(add_bos),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
        chat_template=get("tokenizer.chat_template"),
        architecture=get("general.architecture"),
    )


def _token(vocab: GGUFVocab, token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < len(vocab.tokens):
        return None
    return vocab.tokens[token_id]


def _recover_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best-scoring result first (sentencepiece BPE merges the pair whose result scores highest)."""
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    score_of = dict(zip(tokens, scores, strict=False))
    merges = []
    for merged, score in score_of.items():
        local = []
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                local.append((left, right, score))
        local.sort(key=lambda m: (ids[m[0]], ids[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level(vocab: GGUFVocab) -> HFTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def respell(token: str) -> str:
        # Tokens outside the byte alphabet (some control tokens) are stored as plain text.
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    table = {respell(t): i for i, t in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in (vocab.merges or [])]
    tok = HFTokenizer(
        models.BPE(
            vocab=table,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(vocab.pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(vocab: GGUFVocab) -> HFTokenizer:
    table = {t: i for i, t in enumerate(vocab.tokens)}
    if vocab.merges:
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    else:
        scores = vocab.scores or [-float(i) for i in range(len(vocab.tokens))]
        merges = _recover_merges(vocab.tokens, scores)
    tok = HFTokenizer(
        models.BPE(
            vocab=table,
            merges=merges,
            unk_token=_token(vocab, vocab.unk_id),
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    # Like llama.cpp and sentencepiece: prefix one space (when the file says so) to every run of
    # text, even one that already starts with a space, then spell spaces as "▁". (transformers'
    # Metaspace skips the prefix when the text starts with a space, so " hi" differs there.)
    steps = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def build_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """The HF tokenizer this vocabulary describes (special tokens and BOS/EOS rule included)."""
    if vocab.model == "gpt2":
        tok = _byte_level(vocab)
    elif vocab.model == "llama":
        tok = _sentencepiece_bpe(vocab)
    else:
        raise ValueError(
            f"GGUF tokenizer model {vocab.model!r} is not supported (supported: 'gpt2', 'llama'); "
            "use the model's tokenizer.json instead"
        )

    types = vocab.token_types or []
    alphabet = set(bytes_to_unicode().values()) if vocab.model == "gpt2" else None
    # Control tokens (e.g. <|im_end|>) must be matched whole in text and are special. In a
    # byte-level vocabulary a "control" token outside the byte alphabet is a converter mislabel.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(vocab.tokens, types, strict=False)
        if kind == TOKEN_CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        tok.add_special_tokens(control)
    model_vocab = tok.get_vocab(with_added_tokens=False)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(vocab.tokens, types, strict=False)
        if kind == TOKEN_USER_DEFINED and t in model_vocab
    ]
    if user:
        tok.add_tokens(user)

    bos, eos = _token(vocab, vocab.bos_id), _token(vocab, vocab.eos_id)
    prefix, suffix, specials = [], [], []
    if vocab.add_bos and bos is not None:
        prefix, specials = [bos], [(bos, vocab.bos_id)]
    if vocab.add_eos and eos is not None:
        suffix = [eos]
        specials.append((eos, vocab.eos_id))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=[*prefix, "$A", *suffix],
            pair=[*prefix, "$A", *suffix, "$B:1", *suffix],
            special_tokens=list(dict.fromkeys(specials)),
        )
    return tok
