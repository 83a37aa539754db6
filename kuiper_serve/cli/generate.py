"""`kuiper generate`: in-process with --local, else through a running inference service."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from kuiper_client.client import GenerateChunk, KuiperError

from inference_service.sampling.params import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from kuiper_serve.cli.args import (
    add_client_security_arguments,
    add_inference_address,
    add_model_flags,
    add_sampling_flags,
    apply_threads_flag,
    read_prompt,
    sampling_kwargs,
)
from kuiper_serve.cli.remote import explain, open_client, result_json, stream_to, summary_line
from kuiper_serve.common.defaults import INFERENCE_ADDRESS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a continuation of PROMPT (served, or in-process with --local)",
        description="Stream the continuation of PROMPT to the terminal. With --local the model "
        "runs in this process (no servers); otherwise a running inference service is asked.",
    )
    p.add_argument(
        "prompt",
        metavar="PROMPT",
        help="prompt text ('-' reads standard input, less one trailing newline)",
    )
    p.add_argument("--local", action="store_true", help="run the model in this process")
    add_model_flags(p, device_help="--local: where to run (auto: cuda if present, else cpu)")
    add_inference_address(p)
    p.add_argument(
        "--timeout", type=float, default=None, help="served: deadline in seconds (0: none)"
    )
    add_client_security_arguments(p)
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object at the end: token_ids, text, finish_reason, usage "
                   "(and logprobs); the shape is in docs/serving.md")  # fmt: skip
    p.set_defaults(func=cmd_generate)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        min_p=args.min_p,
        repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    args.prompt = read_prompt(args.prompt)
    if args.logprobs is not None and not args.json:
        print("kuiper generate: --logprobs shows in the --json output; add --json", file=sys.stderr)
        return 2
    unused = unused_flags(args)
    if unused:
        path = "the served path (without --local)" if args.local else "--local"
        print(f"kuiper generate: ignoring {', '.join(unused)}: only {path} uses them",
              file=sys.stderr)  # fmt: skip
    if not args.local:
        return generate_remote(args)
    return generate_local(args)


def unused_flags(args: argparse.Namespace) -> list[str]:
    """Flags given on the command line that the chosen path does not use."""
    if args.local:
        given = [("--address", args.address != INFERENCE_ADDRESS), ("--timeout", args.timeout is not None),
                 ("--tls", args.tls), ("--tls-ca", args.tls_ca is not None)]  # fmt: skip
    else:
        given = [("--model", args.model is not None), ("--device", args.device != "auto"),
                 ("--threads", args.threads is not None)]  # fmt: skip
    return [flag for flag, set_ in given if set_]


def generate_local(args: argparse.Namespace) -> int:
    from inference_service.llm import LLM
    from inference_service.models.config import ModelLoadError

    try:
        params = sampling_params(args)
        params.validate()
    except ValueError as exc:
        return _fail(f"bad parameter: {exc}", 2)
    apply_threads_flag(args)
    try:
        llm = LLM(args.model, device=args.device)
    except (ModelLoadError, FileNotFoundError, RuntimeError, ImportError) as exc:
        return _fail(f"cannot load the model: {exc}", 1)
    token_ids: list[int] = []
    texts: list[str] = []
    logprobs: list = []
    finish = None
    start = time.monotonic()
    first = None
    try:
        prompt_tokens = len(llm.encode(args.prompt))
        for chunk in llm.generate(args.prompt, params):
            first = first or time.monotonic()
            token_ids.append(chunk.token_id)
            texts.append(chunk.text)
            logprobs.append((chunk.token_id, chunk.logprob, chunk.top_logprobs))
            finish = chunk.finish_reason
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except ValueError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:  # Ctrl-C: print what came, exit 130 like an interrupted command
        finish = "cancelled"
    elapsed = time.monotonic() - start
    ttft = (first - start) if first else 0.0
    if args.json:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                 "time_to_first_token_s": ttft, "queue_time_s": 0.0, "cached_prompt_tokens": 0}  # fmt: skip
        lps = logprobs if args.logprobs is not None else None
        print(result_json(token_ids, "".join(texts), finish, usage, lps))
    else:
        sys.stdout.write("\n")
        print(summary_line(finish, prompt_tokens, len(token_ids), ttft, elapsed), file=sys.stderr)
    return 130 if finish == "cancelled" else 0


def _fail(message: str, code: int) -> int:
    print(f"kuiper generate: {' '.join(message.split())}", file=sys.stderr)
    return code


def generate_remote(args: argparse.Namespace) -> int:
    """Stream the answer to args.prompt from the service at args.address, then a summary line
    on stderr; with --json print one object (result_json) at the end instead."""
    as_json = bool(getattr(args, "json", False))
    client = open_client(args, getattr(args, "timeout", None), "generate")
    if client is None:
        return 2
    seen: list[GenerateChunk] = []
    interrupted = False
    start = time.monotonic()
    try:
        with client:
            chunks = client.generate(args.prompt, **sampling_kwargs(args))
            stream_to(None if as_json else sys.stdout, chunks, seen)
    except KuiperError as exc:
        print(f"kuiper generate: {explain(exc, client.address)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: closing the client cancelled the RPC; no traceback
        interrupted = True
    elapsed = time.monotonic() - start
    last = seen[-1] if seen else None
    usage = last.usage if last else None
    finish = "cancelled" if interrupted else (last.finish_reason if last else None)
    token_ids = [t for c in seen for t in c.token_ids]
    if as_json:
        lps = None
        if args.logprobs is not None:
            lps = [(lp.token_id, lp.logprob, lp.top) for c in seen for lp in c.logprobs]
        usage_dict = dataclasses.asdict(usage) if usage else None
        print(result_json(token_ids, "".join(c.text for c in seen), finish, usage_dict, lps))
    else:
        sys.stdout.write("\n")
        if usage is not None:
            print(summary_line(finish, usage.prompt_tokens, usage.completion_tokens,
                               usage.time_to_first_token_s, elapsed), file=sys.stderr)  # fmt: skip
    return 130 if interrupted else 0
