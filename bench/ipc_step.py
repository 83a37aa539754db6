"""Per-step cost of the engine core <-> frontend pipe: one step's outputs for N requests (one
new token each) encoded, sent to another process, decoded there, and an answer back.

    python bench/ipc_step.py [--reps 2000]

Compares the two encodings considered for `engine_core.protocol`: every RequestOutput pickled as an
object (peer) vs the packed id arrays the core sends (ours), over the same multiprocessing
pipe, in the same run. Prints microseconds per round trip and for encoding alone (what the
core's sender thread pays per step) and the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_service.engine.engine import RequestOutput  # noqa: E402
from inference_service.engine_core import protocol as proto  # noqa: E402


def _echo(conn, mode: str) -> None:
    while True:
        data = conn.recv_bytes()
        if data == b"end":
            return
        if mode == "packed":
            n = len(proto.decode_step(proto.loads(data)).outputs)
        else:
            n = len(proto.loads(data))
        conn.send_bytes(n.to_bytes(4, "little"))


def _outputs(n: int, step: int) -> list[RequestOutput]:
    return [RequestOutput(r, [1000 + step], num_prompt_tokens=128) for r in range(1, n + 1)]


def measure(mode: str, n: int, reps: int) -> tuple[float, float]:
    """(round trip us, encode us) per step."""
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_echo, args=(child, mode), daemon=True)
    proc.start()
    encoder = proto.StepEncoder()

    def encode(step: int) -> bytes:
        outs = _outputs(n, step)
        if mode == "packed":
            return encoder.encode(proto.StepBatch(outs))
        return proto.dumps(outs)

    for step in range(50):  # warm up
        parent.send_bytes(encode(step))
        parent.recv_bytes()
    t_enc = 0.0
    t0 = time.perf_counter()
    for step in range(reps):
        e0 = time.perf_counter()
        data = encode(step)
        t_enc += time.perf_counter() - e0
        parent.send_bytes(data)
        assert int.from_bytes(parent.recv_bytes(), "little") == n
    total = time.perf_counter() - t0
    parent.send_bytes(b"end")
    proc.join()
    return total / reps * 1e6, t_enc / reps * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    print("multiprocessing pipe, one message per step, N requests x 1 new token")
    print(f"{'N':>5} {'pickled objects rt us':>22} {'encode us':>10} "
          f"{'packed rt us':>13} {'encode us':>10} {'packed/pickled rt':>18}")  # fmt: skip
    for n in (1, 8, 64, 256):
        obj_rt, obj_enc = measure("objects", n, args.reps)
        pk_rt, pk_enc = measure("packed", n, args.reps)
        print(f"{n:>5} {obj_rt:>22.1f} {obj_enc:>10.1f} {pk_rt:>13.1f} {pk_enc:>10.1f} "
              f"{pk_rt / obj_rt:>17.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
