"""Tiny tokenizers trained on the fly for the tokenizer tests, plus shared test text.

Each builder writes a model into a folder and returns its path. The reference libraries
(`tokenizers`, `sentencepiece`) then serve as oracles for our loader and server.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 style: uses bos_token/eos_token variables and raise_exception.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
    "token", "server", "stream", "naïve", "café", "über", "straße", "привет", "мир",
    "中文", "日本語", "한국어", "東京", "数据", "😀", "🚀", "👍🏽", "🇫🇷", "x=1", "f(x)",
    "print('hi')", "12345", "3.14", "2026", "#include", "<tag>", "a_b", "CamelCase",
]  # fmt: skip


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        seps = [rng.choice([" ", " ", " ", "  ", ", ", ". ", "\t", "\n"]) for _ in words]
        lines.append("".join(w + s for w, s in zip(words, seps, strict=True)).strip())
    return lines


# Varied strings every oracle test runs over.
SAMPLE_TEXTS = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "Hello  world   with   runs of spaces",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\nend",
    "naïve café über straße",
    "привет мир",
    "中文文本和日本語のテキスト",
    "한국어 텍스트",
    "emoji 😀🚀 and 👍🏽 and flags 🇫🇷🇯🇵",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "code: def f(x):\n    return x**2  # square",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> in the middle",
    "mixed: abc中文😀\u00e9\u0301 combining",
    "zero\u200bwidth\u00a0nbsp",
    "rare: \U0001d54f\U0001f9ec\u2603 \u0000 nul",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "'s 't 're 've 'm 'll 'd I'M YOU'LL",
]

_FRAGMENTS = [
    " ", "  ", "   ", "\n", "\n\n", "\t", "😀", "👍🏽", "🇫🇷", "中文", "日本", "é", "e\u0301",
    "hello", " world", "123", "<|im_end|>", "'s", "\u00a0", "\u200d",
]  # fmt: skip

# Random text for property tests: arbitrary Unicode (no lone surrogates, which UTF-8 and
# protobuf cannot carry) mixed with emoji, CJK and whitespace runs.
text_strategy = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
        st.sampled_from(_FRAGMENTS),
    ),
    max_size=8,
).map("".join)


@lru_cache(maxsize=4)
def transformers_gguf_tokenizer(gguf_file: Path):
    """HF transformers' own tokenizer for a GGUF file (the oracle), loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def _write_corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    path.write_text("\n".join(corpus_lines()), encoding="utf-8")
    return path


def build_hf_bpe(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with a ChatML template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def build_sentencepiece(folder: Path, model_type: str, llama_like: bool = False) -> Path:
    """A sentencepiece model (`unigram` or `bpe`) with byte fallback; returns the .model path.

    llama_like: no normalization and whitespace kept as is, as Llama's tokenizer.model does,
    so llama.cpp's (and our GGUF) reading of the vocabulary sees the same text.
    """
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = _write_corpus(folder)
    prefix = folder / f"sp_{model_type}"
    options = dict(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=400,
        hard_vocab_limit=False,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.99,
        num_threads=1,
        minloglevel=2,
    )
    if llama_like:
        options.update(
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
        )
    spm.SentencePieceTrainer.train(**options)
    return prefix.with_suffix(".model")


def _write_gguf(writer: Any) -> None:
    """Write a filled gguf.GGUFWriter's header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_llama_gguf(sp_model: Path, out: Path, chat_template: str | None = None) -> Path:
    """A GGUF file whose embedded vocabulary is `sp_model`, written as llama.cpp's converter
    writes Llama's (tokens, scores, token types, special ids); no tensors."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(kind)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    _write_gguf(writer)
    return out


def build_bpe_gguf(hf_folder: Path, out: Path, pre: str, architecture: str = "llama") -> Path:
    """A GGUF whose embedded vocabulary is the byte-level BPE of `hf_folder` (tokens, merges,
    control tokens), named with the llama.cpp pre-tokenizer `pre`; no tensors."""
    import gguf

    data = json.loads((hf_folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    _write_gguf(writer)
    return out
