"""The in-process tokenizer API: load a model's tokenizer, encode, decode, chat templates.

`load_tokenizer(path)` picks the backend from what the path holds:

* a `.gguf` file (or a folder holding one): the vocabulary embedded in the file
* a folder with `tokenizer.json` (plus `tokenizer_config.json` for special tokens and the
  chat template): HF `tokenizers`
* a sentencepiece `.model` file, or a folder with `tokenizer.model`: `sentencepiece`

Every backend answers through the same `Tokenizer` interface. Ids outside the vocabulary raise
ValueError with a message that says which id and what the valid range is.
"""

from __future__ import annotations

import codecs
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizer_service.chat_template import ChatTemplateError, render_chat_template
from tokenizer_service.incremental import IncrementalDecoder

__all__ = [
    "ChatTemplateError",
    "IncrementalDecoder",
    "Tokenizer",
    "load_tokenizer",
    "validate_ids",
]

# Tokens that end an assistant turn in common chat formats; any present become stop ids.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)


def validate_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raise ValueError naming the first id outside [0, vocab_size)."""
    if not ids:
        return
    if min(ids) >= 0 and max(ids) < vocab_size:
        return
    for position, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"token id {token_id} (position {position}) is out of range: "
                f"the vocabulary has {vocab_size} ids, 0..{vocab_size - 1}"
            )


class Tokenizer(ABC):
    """One model's tokenizer. Subclasses supply the backend-specific encode/decode."""

    backend: str  # "hf-tokenizers", "sentencepiece" or "gguf"
    source: str  # file or folder it was loaded from
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    special_tokens: dict[int, str]  # id -> text of every special (control) token
    stop_ids: list[int]
    chat_template: str | None
    # Byte tokens (<0xE4>) whose decoder judges a whole run of them at once (HF ByteFallback
    # turns every byte of a run with an incomplete character into U+FFFD). The incremental
    # decoder waits for the end of such a run so its deltas add up to decode().
    grouped_byte_ids: frozenset[int] = frozenset()

    # ---- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with special-token text in it encoded as ordinary text (HF's
        split_special_tokens), no BOS/EOS added. Backends that never read control tokens from
        text (sentencepiece) need not override it."""
        return self._encode(text, False)

    @abstractmethod
    def decode_unchecked(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """decode() without the range check (callers that validated already)."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token string as spelled in the vocabulary, or None."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary spelling of an id (e.g. 'Ġthe', '▁the', '<0x0A>')."""

    def _encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        return [self._encode(t, add_special_tokens) for t in texts]

    # ---- public API ----------------------------------------------------------------------
    def validate_ids(self, ids: Sequence[int]) -> None:
        validate_ids(ids, self.vocab_size)

    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS as the model's tokenizer adds.
        With split_special_tokens, special-token text in `text` (e.g. "<|im_end|>") is encoded
        as plain text instead of as the control token."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, not {type(text).__name__}")
        if split_special_tokens and self._has_special_text(text):
            return self._wrap_special(self._encode_plain(text), add_special_tokens)
        return self._encode(text, add_special_tokens)

    def encode_batch(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        split_special_tokens: bool = False,
    ) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"text must be a str, not {type(text).__name__}")
        if split_special_tokens and any(map(self._has_special_text, texts)):
            return [self.encode(t, add_special_tokens, True) for t in texts]
        return self._encode_batch(texts, add_special_tokens)

    def _has_special_text(self, text: str) -> bool:
        return any(t in text for t in self.special_tokens.values() if t)

    def _wrap_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        """ids with BOS/EOS as encode() adds them: taken from how the tokenizer wraps ''."""
        if not add_special_tokens:
            return ids
        empty = self._encode("", True)
        bos = [empty[0]] if empty and empty[0] == self.bos_id else []
        eos = [empty[-1]] if empty and empty[-1] == self.eos_id and len(empty) > len(bos) else []
        return bos + ids + eos

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[str, list[int]]:
        """The rendered chat text and its ids, where only the template's own markup yields
        control tokens: special-token text inside a message's content is encoded as plain text,
        so a user cannot forge turns or a system prompt."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and self._has_special_text(c) for c in contents):
            return text, self._encode(text, False)
        # Render again with a placeholder per content: what lies between them is markup.
        marked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
        parts = _PLACEHOLDER.split(self.apply_chat_template(marked, add_generation_prompt))
        ids: list[int] = []
        pos = 0
        for k in range(0, len(parts), 2):
            markup = parts[k]
            if not text.startswith(markup, pos):
                raise ChatTemplateError(_UNSEPARABLE)
            ids += self._encode(markup, False)
            pos += len(markup)
            if k + 1 == len(parts):
                break
            content, after = str(contents[int(parts[k + 1])]), parts[k + 2]
            # Templates may trim a content; find the form they wrote.
            for form in dict.fromkeys(
                (content, content.strip(), content.lstrip(), content.rstrip())
            ):
                if text.startswith(form + after, pos):
                    ids += self._encode_plain(form) if form else []
                    pos += len(form)
                    break
            else:
                raise ChatTemplateError(_UNSEPARABLE)
        if pos != len(text):
            raise ChatTemplateError(_UNSEPARABLE)
        return text, ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Raises ValueError for ids outside the vocabulary."""
        self.validate_ids(ids)
        return self.decode_unchecked(ids, skip_special_tokens)

    def _token_text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        return self.special_tokens.get(token_id) or self.id_to_token(token_id)

    def template_tokens(self) -> dict[str, str | None]:
        """The special-token variables chat templates read (bos_token, eos_token, ...)."""
        return {
            "bos_token": self._token_text(self.bos_id),
            "eos_token": self._token_text(self.eos_id),
            "unk_token": self._token_text(self.unk_id),
            "pad_token": self._token_text(self.pad_id),
        }

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **extra: Any,
    ) -> str:
        """Render chat messages with the model's template (ChatTemplateError when it refuses)."""
        if self.chat_template is None:
            raise ChatTemplateError(f"the tokenizer at {self.source} has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            self.template_tokens(),
            **extra,
        )

    def incremental_decoder(
        self, context_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> IncrementalDecoder:
        return IncrementalDecoder(self, context_ids, skip_special_tokens)

    def _finish_stop_ids(self, extra: Sequence[int] = ()) -> None:
        stops = [self.eos_id] if self.eos_id is not None else []
        stops += [i for i in extra if 0 <= i < self.vocab_size]
        for name in END_OF_TURN_TOKENS:
            token_id = self.token_to_id(name)
            if token_id is not None and token_id in self.special_tokens:
                stops.append(token_id)
        self.stop_ids = list(dict.fromkeys(stops))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, source={self.source!r}, "
            f"vocab_size={self.vocab_size})"
        )


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
_UNSEPARABLE = (
    "a message contains special-token text and this chat template changes message contents, "
    "so they cannot be encoded apart from its markup; remove the special-token text"
)

# One U+FFFD per byte of an invalid or incomplete UTF-8 sequence, as sentencepiece decodes.
_PER_BYTE_REPLACE = "kuiper-per-byte-replace"
codecs.register_error(
    _PER_BYTE_REPLACE,
    lambda err: ("\ufffd" * (err.end - err.start), err.end),  # type: ignore[attr-defined]
)


def _has_byte_fallback_decoder(tok: Any) -> bool:
    decoder = json.loads(tok.to_str()).get("decoder")
    return '"ByteFallback"' in json.dumps(decoder)


@dataclass
class _ByteTable:
    """Decoding of a sentencepiece-style GGUF vocabulary as llama.cpp and sentencepiece do it:
    concatenate each token's bytes (byte tokens give their byte, "▁" a space), then decode
    UTF-8 replacing each invalid byte with U+FFFD, and drop the one prefix space."""

    pieces: list[bytes]
    special: frozenset[int]
    strip_prefix_space: bool

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        pieces, special = self.pieces, self.special
        if skip_special_tokens:
            data = b"".join(pieces[i] for i in ids if i not in special)
        else:
            data = b"".join(pieces[i] for i in ids)
        text = data.decode("utf-8", errors=_PER_BYTE_REPLACE)
        if self.strip_prefix_space and text.startswith(" "):
            text = text[1:]
        return text


def _sentencepiece_byte_table(tokens: Sequence[str], special: set[int], strip: bool) -> _ByteTable:
    pieces = []
    for i, token in enumerate(tokens):
        if i in special:
            pieces.append(token.encode("utf-8"))
        elif _BYTE_TOKEN.match(token):
            pieces.append(bytes([int(token[3:5], 16)]))
        else:
            pieces.append(token.replace("\u2581", " ").encode("utf-8"))
    return _ByteTable(pieces, frozenset(special), strip)


class HFTokenizer(Tokenizer):
    """Backed by an HF `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF)."""

    def __init__(
        self,
        tok: Any,
        *,
        backend: str,
        source: str,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        unk_token: str | None,
        chat_template: str | None,
        extra_stop_ids: Sequence[int] = (),
        byte_table: _ByteTable | None = None,
    ) -> None:
        self._tok = tok
        self._plain_tok: Any = None  # built on first use (_encode_plain)
        self._byte_table = byte_table
        self.backend = backend
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            i: t.content for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special
        }
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_id = self.token_to_id(pad_token) if pad_token else None
        self.unk_id = self.token_to_id(unk_token) if unk_token else None
        self.chat_template = chat_template
        self._finish_stop_ids(extra_stop_ids)
        if byte_table is None and _has_byte_fallback_decoder(tok):
            self.grouped_byte_ids = frozenset(
                i for t, i in tok.get_vocab(with_added_tokens=False).items() if _BYTE_TOKEN.match(t)
            )

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode_plain(self, text: str) -> list[int]:
        # A second tokenizer whose special tokens are split like text: the setting is per
        # tokenizer object, and the shared one serves other threads meanwhile.
        if self._plain_tok is None:
            plain = type(self._tok).from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain
        return self._plain_tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        # encode_batch runs in parallel in Rust, without the GIL.
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode_unchecked(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if self._byte_table is not None:
            return self._byte_table.decode(ids, skip_special_tokens)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


class SentencePieceTokenizer(Tokenizer):
    """Backed by a sentencepiece `.model` file."""

    backend = "sentencepiece"

    def __init__(
        self,
        model_file: Path,
        *,
        add_bos: bool = True,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{model_file} is not a sentencepiece model: {exc}") from exc
        sp = self._sp
        self.source = str(model_file)
        self.vocab_size = sp.get_piece_size()

        def optional(token_id: int) -> int | None:
            return token_id if 0 <= token_id < self.vocab_size else None

        self.bos_id, self.eos_id = optional(sp.bos_id()), optional(sp.eos_id())
        self.pad_id, self.unk_id = optional(sp.pad_id()), optional(sp.unk_id())
        # Control symbols (<s>, </s>, ...) are what sentencepiece leaves out of decoded text.
        self.special_tokens = {
            i: sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i)
        }
        self._add_bos = add_bos and self.bos_id is not None
        self._add_eos = add_eos and self.eos_id is not None
        self.chat_template = chat_template
        self._finish_stop_ids(extra_stop_ids)

    def _wrap(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self._add_bos:
                ids.insert(0, self.bos_id)  # type: ignore[arg-type]
            if self._add_eos:
                ids.append(self.eos_id)  # type: ignore[arg-type]
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._wrap(self._sp.encode(text), add_special_tokens)

    def _encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        return [self._wrap(ids, add_special_tokens) for ids in self._sp.encode(list(texts))]

    def decode_unchecked(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        specials = self.special_tokens
        if skip_special_tokens or not any(i in specials for i in ids):
            return self._sp.decode(ids)  # sentencepiece drops control symbols itself
        # Show control symbols as text; decode the runs between them.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in specials:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(specials[token_id])
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


# ---- loading ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _folder_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The chat template shipped in an HF folder (chat_template.jinja, .json or the config)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _folder_eos_ids(folder: Path) -> list[int]:
    """eos_token_id of generation_config.json / config.json (Llama 3.1 lists several)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        ids += [v for v in values if isinstance(v, int)]
    return ids


def _load_hf_json(tokenizer_json: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    folder = tokenizer_json.parent
    try:
        tok = RawTokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises its own Exception type on bad files
        raise ValueError(f"{tokenizer_json} is not a valid tokenizer.json: {exc}") from exc
    config = _read_json(folder / "tokenizer_config.json")
    return HFTokenizer(
        tok,
        backend="hf-tokenizers",
        source=str(folder),
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        pad_token=_token_content(config.get("pad_token")),
        unk_token=_token_content(config.get("unk_token")),
        chat_template=_folder_chat_template(folder, config),
        extra_stop_ids=_folder_eos_ids(folder),
    )


def _load_sentencepiece(model_file: Path) -> SentencePieceTokenizer:
    folder = model_file.parent
    config = _read_json(folder / "tokenizer_config.json")
    return SentencePieceTokenizer(
        model_file,
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=_folder_chat_template(folder, config),
        extra_stop_ids=_folder_eos_ids(folder),
    )


def _load_gguf(gguf_file: Path) -> HFTokenizer:
    from tokenizer_service.gguf_vocab import TOKEN_CONTROL, build_tokenizer, read_gguf_vocab

    vocab = read_gguf_vocab(gguf_file)
    tok = build_tokenizer(vocab)

    def token(token_id: int | None) -> str | None:
        return (
            vocab.tokens[token_id]
            if token_id is not None and token_id < len(vocab.tokens)
            else None
        )

    byte_table = None
    if vocab.model == "llama":  # decode as sentencepiece / llama.cpp do (see _ByteTable)
        control = {i for i, kind in enumerate(vocab.token_types or []) if kind == TOKEN_CONTROL}
        byte_table = _sentencepiece_byte_table(vocab.tokens, control, vocab.add_space_prefix)
    return HFTokenizer(
        tok,
        backend="gguf",
        source=str(gguf_file),
        bos_token=token(vocab.bos_id),
        eos_token=token(vocab.eos_id),
        pad_token=token(vocab.pad_id),
        unk_token=token(vocab.unk_id),
        chat_template=vocab.chat_template,
        byte_table=byte_table,
    )


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer a model file or folder holds (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source not found: {path}")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_hf_json(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return _load_sentencepiece(path / "tokenizer.model")
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _load_gguf(ggufs[0])
        raise ValueError(
            f"{path} holds no tokenizer: expected tokenizer.json, tokenizer.model or a .gguf file"
        )
    if path.suffix == ".gguf" or _is_gguf(path):
        return _load_gguf(path)
    if path.suffix == ".json":
        return _load_hf_json(path)
    if path.suffix == ".model":
        return _load_sentencepiece(path)
    raise ValueError(
        f"cannot tell what tokenizer {path} is: give a .gguf file, a sentencepiece .model file, "
        "or a folder with tokenizer.json / tokenizer.model"
    )
