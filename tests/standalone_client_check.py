"""Run by tests/test_client_dist.py with the interpreter of a fresh venv that holds only the
kuiper-client distribution, grpcio and protobuf: every RPC of both services through the sync
and the asyncio client, results printed as one JSON object for the test to check.

usage: python standalone_client_check.py INFERENCE_ADDRESS TOKENIZER_ADDRESS PROMPT N
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from kuiper_client import AsyncKuiperClient, KuiperClient, KuiperError


def sync_calls(address: str, tok_address: str, prompt: str, n: int) -> dict:
    out: dict = {}
    with KuiperClient(address, tokenizer_address=tok_address, timeout=60) as c:
        c.wait_until_serving(timeout=60)
        out["health"] = [c.health("inference"), c.health("tokenizer")]
        out["model_info"] = dataclasses.asdict(c.model_info())
        out["tokenizer_info"] = dataclasses.asdict(c.tokenizer_info())
        out["encode"] = c.encode(prompt)
        out["encode_batch"] = c.encode([prompt, "x"], add_special_tokens=False)
        out["decode"] = c.decode(out["encode"])
        out["decode_batch"] = c.decode(out["encode_batch"], skip_special_tokens=True)
        done = c.complete(out["encode"], max_new_tokens=n, temperature=0.0, ignore_eos=True)
        out["generate"] = dataclasses.asdict(done)
        with c.decode_stream() as ds:
            pieces = [ds.push([t], context_ids=out["encode"]) for t in done.token_ids]
            pieces.append(ds.finish())
        out["decode_stream"] = pieces
        messages = [("user", prompt)]
        out["chat_template"] = dataclasses.asdict(c.apply_chat_template(messages))
        chunks = list(c.chat(messages, max_new_tokens=n, temperature=0.0, ignore_eos=True))
        out["chat_ids"] = [t for ch in chunks for t in ch.token_ids]
        try:
            c.decode([out["tokenizer_info"]["vocab_size"]])
        except KuiperError as exc:
            out["bad_decode"] = exc.code.name
    return out


async def async_calls(address: str, tok_address: str, prompt: str, n: int) -> dict:
    out: dict = {}
    async with AsyncKuiperClient(address, tokenizer_address=tok_address, timeout=60) as c:
        await c.wait_until_serving(timeout=60)
        out["health"] = [await c.health("inference"), await c.health("tokenizer")]
        out["model_info"] = dataclasses.asdict(await c.model_info())
        out["tokenizer_info"] = dataclasses.asdict(await c.tokenizer_info())
        out["encode"] = await c.encode(prompt)
        out["encode_batch"] = await c.encode([prompt, "x"], add_special_tokens=False)
        out["decode"] = await c.decode(out["encode"])
        out["decode_batch"] = await c.decode(out["encode_batch"], skip_special_tokens=True)
        done = await c.complete(out["encode"], max_new_tokens=n, temperature=0.0, ignore_eos=True)
        out["generate"] = dataclasses.asdict(done)
        async with c.decode_stream() as ds:
            pieces = [await ds.push([t], context_ids=out["encode"]) for t in done.token_ids]
            pieces.append(await ds.finish())
        out["decode_stream"] = pieces
        messages = [{"role": "user", "content": prompt}]
        out["chat_template"] = dataclasses.asdict(await c.apply_chat_template(messages))
        chunks = [ch async for ch in c.chat(messages, max_new_tokens=n, temperature=0.0,
                                            ignore_eos=True)]  # fmt: skip
        out["chat_ids"] = [t for ch in chunks for t in ch.token_ids]
        try:
            await c.decode([out["tokenizer_info"]["vocab_size"]])
        except KuiperError as exc:
            out["bad_decode"] = exc.code.name
    return out


def main() -> None:
    address, tok_address, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    result = {
        "sync": sync_calls(address, tok_address, prompt, n),
        "async": asyncio.run(async_calls(address, tok_address, prompt, n)),
        "modules": sorted(sys.modules),
        "path": sys.path,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
