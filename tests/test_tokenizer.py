"""The in-process tokenizer API against the reference libraries.

Oracles: `tokenizers` itself for tokenizer.json, `sentencepiece` itself for .model files (and
for a GGUF written from such a model), HF transformers' GGUF conversion for SmolLM2, and
`decode` of the whole sequence for the incremental decoder.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_models import (
    CHATML_TEMPLATE,
    LLAMA2_TEMPLATE,
    SAMPLE_TEXTS,
    build_bpe_gguf,
    build_hf_bpe,
    build_llama_gguf,
    build_sentencepiece,
    corpus_lines,
    text_strategy,
    transformers_gguf_tokenizer,
)

from tokenizer_service.tokenizer import (
    ChatTemplateError,
    IncrementalDecoder,
    Tokenizer,
    load_tokenizer,
    validate_ids,
)

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    sp_bpe = build_sentencepiece(root / "sp_bpe", "bpe", llama_like=True)
    return {
        "hf": build_hf_bpe(root / "hf"),
        "sp_unigram": build_sentencepiece(root / "sp_uni", "unigram"),
        "sp_bpe": sp_bpe,
        "gguf_llama": build_llama_gguf(sp_bpe, root / "llama.gguf", LLAMA2_TEMPLATE),
    }


@pytest.fixture(scope="module")
def hf_oracle(models):
    from tokenizers import Tokenizer as RawTokenizer

    return RawTokenizer.from_file(str(models["hf"] / "tokenizer.json"))


def _sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


# ---- backends against their reference libraries -------------------------------------------


def test_hf_folder_metadata(models):
    tok = load_tokenizer(models["hf"])
    assert tok.backend == "hf-tokenizers"
    assert tok.special_tokens == {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert set(tok.stop_ids) == {2, 0}  # eos <|im_end|> and <|endoftext|>
    assert tok.chat_template == CHATML_TEMPLATE


def test_hf_folder_matches_tokenizers(models, hf_oracle):
    tok = load_tokenizer(models["hf"])
    assert tok.vocab_size == hf_oracle.get_vocab_size()
    for text in SAMPLE_TEXTS + corpus_lines(100, seed=3):
        ids = hf_oracle.encode(text).ids
        assert tok.encode(text) == ids
        assert tok.decode(ids) == hf_oracle.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == hf_oracle.decode(ids)


@PROPERTY
@given(text=text_strategy)
def test_hf_folder_matches_tokenizers_random(models, hf_oracle, text):
    tok = load_tokenizer_cached(models["hf"])
    ids = hf_oracle.encode(text).ids
    assert tok.encode(text) == ids
    assert tok.decode(ids) == hf_oracle.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("kind", ["sp_unigram", "sp_bpe"])
def test_sentencepiece_matches_library(models, kind):
    tok = load_tokenizer(models[kind])
    sp = _sp(models[kind])
    assert tok.backend == "sentencepiece"
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.eos_id in tok.stop_ids
    for text in SAMPLE_TEXTS + corpus_lines(100, seed=4):
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.encode(text) == [sp.bos_id(), *ids]  # BOS by default, as Llama's tokenizer
        assert tok.decode(ids) == sp.decode(ids)
        # Special tokens are skipped on request and shown otherwise.
        with_special = [sp.bos_id(), *ids, sp.eos_id()]
        assert tok.decode(with_special, skip_special_tokens=True) == sp.decode(ids)
        assert tok.decode(with_special).startswith("<s>")
        assert tok.decode(with_special).endswith("</s>")


@PROPERTY
@given(text=text_strategy)
def test_sentencepiece_matches_library_random(models, text):
    for kind in ("sp_unigram", "sp_bpe"):
        tok = load_tokenizer_cached(models[kind])
        sp = _sp_cached(models[kind])
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids) == sp.decode(ids)


def test_sentencepiece_byte_fallback_is_used(models):
    # The oracle tests above only mean something if rare characters really fall back to bytes.
    sp = _sp(models["sp_bpe"])
    pieces = [sp.id_to_piece(i) for i in sp.encode("🦜 ǂ")]
    assert any(p.startswith("<0x") for p in pieces)
    tok = load_tokenizer(models["sp_bpe"])
    assert tok.decode(sp.encode("🦜 ǂ")) == "🦜 ǂ"


def test_gguf_llama_vocab_matches_sentencepiece(models):
    """A GGUF carrying a sentencepiece BPE vocabulary (scores, token types, byte tokens)
    encodes like sentencepiece itself, which is what llama.cpp reproduces."""
    tok = load_tokenizer(models["gguf_llama"])
    sp = _sp(models["sp_bpe"])
    assert tok.backend == "gguf"
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    for text in SAMPLE_TEXTS + corpus_lines(100, seed=5):
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [sp.bos_id(), *ids]
        assert tok.decode(ids) == sp.decode(ids)


def test_gguf_llama_decodes_broken_bytes_like_sentencepiece(models):
    tok = load_tokenizer(models["gguf_llama"])
    sp = _sp(models["sp_bpe"])
    byte = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    ids = sp.encode("ab") + [byte[b] for b in "文".encode()] + [byte[0xF0], byte[0x9F]]
    ids += [byte[0x80]] + sp.encode(" end")  # a stray continuation byte too
    assert tok.decode(ids) == sp.decode(ids)
    assert "文" in tok.decode(ids)


@PROPERTY
@given(text=text_strategy)
def test_gguf_llama_vocab_matches_sentencepiece_random(models, text):
    tok = load_tokenizer_cached(models["gguf_llama"])
    sp = _sp_cached(models["sp_bpe"])
    ids = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == sp.decode(ids)


def test_fast_gguf_metadata_reader_equals_gguf_library(models, tmp_path):
    """Our header-only GGUF reader returns exactly what gguf.GGUFReader reads."""
    from gguf import GGUFReader

    from kuiper_serve.common.gguf import read_gguf_metadata

    files = [models["gguf_llama"], build_bpe_gguf(models["hf"], tmp_path / "b.gguf", "qwen2")]
    for path in files:
        reader = GGUFReader(path)
        expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert read_gguf_metadata(path) == expected
        assert "tokenizer.ggml.tokens" in expected


@pytest.mark.parametrize(
    ("pre", "architecture"),
    [("qwen2", "qwen2"), ("llama-bpe", "llama"), ("gpt-4o", "llama"), ("smollm", "llama")],
)
def test_gguf_bpe_pre_tokenizers_match_transformers(models, tmp_path, pre, architecture):
    """Byte-level BPE GGUFs split text by the regex `tokenizer.ggml.pre` names."""
    pytest.importorskip("transformers", reason="transformers is the GGUF oracle")
    gguf_file = build_bpe_gguf(models["hf"], tmp_path / f"{pre}.gguf", pre, architecture)
    ours = load_tokenizer(gguf_file)
    theirs = transformers_gguf_tokenizer(gguf_file)
    for text in SAMPLE_TEXTS + corpus_lines(100, seed=8):
        assert ours.encode(text) == theirs.encode(text), text
    # The regexes really differ: Qwen2 splits numbers into single digits, GPT-2 does not.
    if pre == "qwen2":
        default = load_tokenizer(build_bpe_gguf(models["hf"], tmp_path / "d.gguf", "default"))
        assert ours.encode("12345") != default.encode("12345")


# ---- SmolLM2 GGUF against transformers -----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    pytest.importorskip("transformers", reason="transformers is the GGUF oracle")
    return transformers_gguf_tokenizer(smollm2_gguf)


def test_smollm2_metadata_matches_transformers(smollm2, smollm2_hf):
    assert smollm2.backend == "gguf"
    assert smollm2.vocab_size == len(smollm2_hf)
    assert smollm2.bos_id == smollm2_hf.bos_token_id
    assert smollm2.eos_id == smollm2_hf.eos_token_id
    assert smollm2.pad_id == smollm2_hf.pad_token_id
    hf_special = {i: t.content for i, t in smollm2_hf.added_tokens_decoder.items() if t.special}
    assert smollm2.special_tokens == hf_special
    assert smollm2.token_to_id("<|im_end|>") in smollm2.stop_ids


def test_smollm2_encodes_like_transformers(smollm2, smollm2_hf):
    texts = SAMPLE_TEXTS + corpus_lines(200, seed=6)
    for text in texts:
        for special in (True, False):
            expected = smollm2_hf.encode(text, add_special_tokens=special)
            assert smollm2.encode(text, add_special_tokens=special) == expected, text
        ids = smollm2_hf.encode(text)
        for skip in (False, True):
            assert smollm2.decode(ids, skip_special_tokens=skip) == smollm2_hf.decode(
                ids, skip_special_tokens=skip
            )


@PROPERTY
@given(text=text_strategy)
def test_smollm2_encodes_like_transformers_random(smollm2, smollm2_hf, text):
    ids = smollm2_hf.encode(text)
    assert smollm2.encode(text) == ids
    assert smollm2.decode(ids) == smollm2_hf.decode(ids)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Quatre."},
        {"role": "user", "content": "Et 3+3 ? 中文 😀"},
    ],
    [{"role": "user", "content": "  spaces  \n\n and newlines "}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_hf, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = smollm2_hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert smollm2.apply_chat_template(messages, add_generation_prompt) == expected


def test_llama2_template_uses_special_tokens_and_raise_exception(models):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    ours = load_tokenizer(models["gguf_llama"])
    theirs = transformers.AutoTokenizer.from_pretrained(
        str(models["gguf_llama"].parent), gguf_file=models["gguf_llama"].name
    )
    messages = CONVERSATIONS[1]
    expected = theirs.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert expected.startswith("<s>[INST] <<SYS>>")  # the template really used bos_token
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.apply_chat_template(bad, add_generation_prompt=True)


# Exercises what real templates use: namespace, tojson on non-ASCII, dict(), loop controls,
# `is defined` on special tokens, and whitespace control (trim_blocks / lstrip_blocks).
FEATURE_TEMPLATE = """{%- set ns = namespace(count=0, last_user='') -%}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.count = ns.count + 1 %}
        {%- set ns.last_user = message['content'] %}
    {%- endif %}
{%- endfor %}
{{ bos_token if bos_token is defined else '' }}[{{ ns.count }} user turns]
{% for message in messages %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
<{{ message['role'] }}>{{ message['content'] | trim }}</{{ message['role'] }}>
    {{ dict(role=message['role'], n=loop.index) | tojson }}
{% endfor %}
last={{ ns.last_user | tojson }} pad={{ pad_token is defined }} unk={{ unk_token is defined }}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_template_features_match_transformers(models, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    import shutil

    folder = tmp_path / "feature"
    shutil.copytree(models["hf"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = FEATURE_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        for add in (False, True):
            expected = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add
            )
            assert ours.apply_chat_template(messages, add) == expected


def test_no_chat_template_is_a_clear_error(models):
    tok = load_tokenizer(models["sp_unigram"])
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], True)


def test_template_sandbox_blocks_python_internals(models):
    tok = load_tokenizer(models["hf"])
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], False)


# ---- incremental decoding ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_byte_fallback(models, tmp_path_factory):
    """A llama-style tokenizer.json (Metaspace, ByteFallback decoder), written by transformers
    from the sentencepiece GGUF."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the folder")
    folder = tmp_path_factory.mktemp("hf_byte_fallback")
    gguf_file = models["gguf_llama"]
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    hf.save_pretrained(str(folder))
    tok = load_tokenizer(folder)
    assert tok.backend == "hf-tokenizers" and tok.grouped_byte_ids
    return tok


def _all_tokenizers(models, smollm2, hf_byte_fallback) -> list[Tokenizer]:
    return [
        hf_byte_fallback,
        load_tokenizer_cached(models["hf"]),
        load_tokenizer_cached(models["sp_unigram"]),
        load_tokenizer_cached(models["sp_bpe"]),
        load_tokenizer_cached(models["gguf_llama"]),
        smollm2,
    ]


def _stream(tok: Tokenizer, ids, chunks, skip=False, context=()) -> tuple[str, list[str]]:
    decoder = IncrementalDecoder(tok, context, skip_special_tokens=skip)
    deltas, pos = [], 0
    for size in chunks:
        deltas.append(decoder.push(ids[pos : pos + size]))
        pos += size
    deltas.append(decoder.flush())
    return "".join(deltas), deltas


def test_incremental_equals_decode_for_every_prefix(models, smollm2, hf_byte_fallback):
    texts = SAMPLE_TEXTS + ["🇫🇷👍🏽中文\u00e9 end", "a\u0301\u0302 b"]
    for tok in _all_tokenizers(models, smollm2, hf_byte_fallback):
        for text in texts:
            ids = tok.encode(text)
            if tok.eos_id is not None:
                ids = [*ids, tok.eos_id]
            for k in range(len(ids) + 1):
                prefix = ids[:k]
                for skip in (False, True):
                    joined, deltas = _stream(tok, prefix, [1] * k, skip=skip)
                    assert joined == tok.decode(prefix, skip_special_tokens=skip), (tok, text, k)
                    # No delta but the final flush may end inside a character.
                    assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def test_incremental_random_chunks(models, smollm2, hf_byte_fallback):
    rng = random.Random(7)
    for tok in _all_tokenizers(models, smollm2, hf_byte_fallback):
        for text in SAMPLE_TEXTS:
            ids = tok.encode(text)
            chunks, left = [], len(ids)
            while left:
                chunks.append(min(left, rng.randint(0, 4)))
                left -= chunks[-1]
            assert _stream(tok, ids, chunks)[0] == tok.decode(ids)


@PROPERTY
@given(text=text_strategy, data=st.data())
def test_incremental_equals_decode_random(models, smollm2, hf_byte_fallback, text, data):
    for tok in _all_tokenizers(models, smollm2, hf_byte_fallback):
        ids = tok.encode(text)
        chunks, left = [], len(ids)
        while left:
            chunks.append(data.draw(st.integers(1, min(left, 5))))
            left -= chunks[-1]
        for skip in (False, True):
            assert _stream(tok, ids, chunks, skip=skip)[0] == tok.decode(ids, skip)


def test_incremental_holds_back_split_characters(smollm2):
    # "😀" is 4 bytes; the byte-level vocabulary splits it over several tokens.
    ids = smollm2.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    decoder = IncrementalDecoder(smollm2)
    deltas = [decoder.push([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "😀"
    assert decoder.flush() == ""


def test_incremental_flush_emits_incomplete_bytes_like_decode(models):
    tok = load_tokenizer_cached(models["gguf_llama"])
    byte_ids = [tok.token_to_id("<0xF0>"), tok.token_to_id("<0x9F>")]  # half an emoji
    decoder = IncrementalDecoder(tok)
    assert decoder.push(byte_ids) == ""
    assert decoder.flush() == tok.decode(byte_ids)


def test_incremental_context_gives_leading_space(models, smollm2):
    """Streamed ids after a prompt decode with the space the prompt context implies,
    which decoding them alone loses in sentencepiece-style decoders."""
    for tok in (load_tokenizer_cached(models["gguf_llama"]), smollm2):
        prompt = tok.encode("hello world the", add_special_tokens=False)
        full = tok.encode("hello world the quick fox", add_special_tokens=False)
        assert full[: len(prompt)] == prompt
        generated = full[len(prompt) :]
        text, _ = _stream(tok, generated, [1] * len(generated), context=prompt)
        assert text == " quick fox"


def test_incremental_work_per_push_is_bounded(models):
    """Each push decodes a short window, not the whole sequence."""
    tok = load_tokenizer_cached(models["hf"])
    ids = tok.encode(" ".join(corpus_lines(100)))
    assert len(ids) > 1000
    windows = []
    original = tok.decode_unchecked

    def spy(window, skip=False):
        windows.append(len(window))
        return original(window, skip)

    tok.decode_unchecked = spy  # type: ignore[method-assign]
    try:
        joined, _ = _stream(tok, ids, [1] * len(ids))
    finally:
        del tok.decode_unchecked
    assert joined == tok.decode(ids)
    assert max(windows) <= 8


# ---- validation and loading errors ---------------------------------------------------------


def test_ids_out_of_range_are_rejected(models):
    tok = load_tokenizer_cached(models["hf"])
    n = tok.vocab_size
    with pytest.raises(ValueError, match=rf"token id {n} \(position 1\) is out of range"):
        tok.decode([5, n])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        IncrementalDecoder(tok).push([0, n + 10])
    validate_ids([0, n - 1], n)  # both ends of the range are fine


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_tokenizer(junk)


# ---- helpers ---------------------------------------------------------------------------------

_CACHE: dict[str, object] = {}


def load_tokenizer_cached(path) -> Tokenizer:
    key = f"tok:{path}"
    if key not in _CACHE:
        _CACHE[key] = load_tokenizer(path)
    return _CACHE[key]  # type: ignore[return-value]


def _sp_cached(path):
    key = f"sp:{path}"
    if key not in _CACHE:
        _CACHE[key] = _sp(path)
    return _CACHE[key]
