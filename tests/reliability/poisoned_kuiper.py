"""`kuiper` (as `python -m kuiper_serve.cli`) with three test-only faults, each tripped by one
marked request alone (the product has no such hooks):

- the numpy backend's step raises when it holds a chunk that starts a sequence with the token
  id in $KUIPER_TEST_POISON_ID (a prompt's first token; generated tokens are never at
  position 0, so other requests never trip it);
- the stop-string matcher raises on a request with the stop string $KUIPER_TEST_POISON_STOP;
- encoding logprobs for the client raises for a request that asks for
  $KUIPER_TEST_POISON_LOGPROBS of them.

The patches are applied at import, outside the `__main__` guard: multiprocessing's spawn start
method runs this script again (as `__mp_main__`) in the engine-core process and in the extra
frontend processes (`--frontends N`), so they are poisoned too, as `--single-process` is.
"""

from __future__ import annotations

import os
import sys

from kuiper.v1 import inference_pb2 as ipb

from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.engine.stop_strings import StopStringMatcher

POISON = int(os.environ["KUIPER_TEST_POISON_ID"])
POISON_STOP = os.environ["KUIPER_TEST_POISON_STOP"]
POISON_LOGPROBS = int(os.environ["KUIPER_TEST_POISON_LOGPROBS"])

_step = NumpyBackend.step
_feed = StopStringMatcher.feed
_TokenLogprob = ipb.TokenLogprob


def _poisoned_step(self, batch):
    if any(item.start_pos == 0 and int(item.token_ids[0]) == POISON for item in batch):
        raise RuntimeError(f"poisoned prompt (first token {POISON}) in the batch")
    return _step(self, batch)


def _poisoned_feed(self, delta):
    if POISON_STOP in self.stops:
        raise ValueError("poisoned stop string")
    return _feed(self, delta)


def _poisoned_token_logprob(**fields):
    # the server's response encoding (server._logprobs_proto) builds one per token; patched
    # here, not in server.py, whose import must wait (it imports prometheus_client, which
    # `--frontends N` sets up first)
    if len(fields.get("top", ())) == POISON_LOGPROBS:
        raise ValueError("poisoned logprobs")
    return _TokenLogprob(**fields)


NumpyBackend.step = _poisoned_step
StopStringMatcher.feed = _poisoned_feed
ipb.TokenLogprob = _poisoned_token_logprob

if __name__ == "__main__":
    from kuiper_serve.cli.main import main

    sys.exit(main())
