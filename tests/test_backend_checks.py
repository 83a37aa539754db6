"""check_batch: the batch validation every backend (numpy, cuda) runs before touching memory."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.backends.base import BatchItem, check_batch

LIMITS = dict(block_size=4, num_blocks=8, vocab_size=100, max_model_len=12)


def item(ids, start=0, table=(0, 1, 2)) -> BatchItem:
    return BatchItem(seq_id=7, token_ids=np.array(ids, np.int32), start_pos=start,
                     block_table=list(table))  # fmt: skip


def test_a_valid_batch_passes():
    check_batch([item([1, 2, 3, 4, 5]), item([99], start=11)], **LIMITS)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (item([]), "sequence 7: no tokens to run"),
        (item([1] * 5, table=(0,)), "block table of 1 blocks cannot hold 5 positions"),
        (
            item([1], start=12, table=(0, 1, 2, 3)),
            "13 positions exceed the backend's maximum of 12",
        ),
        (item([1], table=(8,)), r"block id out of range 0\.\.7"),
        (item([1], table=(-1,)), r"block id out of range 0\.\.7"),
        (item([100]), r"token id out of range 0\.\.99"),
        (item([3, -1]), r"token id out of range 0\.\.99"),
    ],
)
def test_bad_items_are_refused_naming_the_sequence(bad, message):
    with pytest.raises(ValueError, match=message):
        check_batch([item([1]), bad], **LIMITS)


def test_unused_table_entries_are_not_checked():
    # A table may be longer than the positions need (blocks reserved ahead); only used ones count.
    check_batch([item([1, 2], table=(0, 99))], **LIMITS)


def item_by_item(batch, limits) -> str | None:
    """The definition: the first failing item's reason, items in order (None: all pass)."""
    bs, nb, vocab, mml = (limits[k] for k in ("block_size", "num_blocks", "vocab_size",
                                              "max_model_len"))  # fmt: skip
    for it in batch:
        n, end = len(it.token_ids), it.start_pos + len(it.token_ids)
        used = it.block_table[: -(-end // bs)]
        if n == 0:
            return "no tokens"
        if len(it.block_table) * bs < end:
            return "block table"
        if end > mml:
            return "exceed"
        if min(used) < 0 or max(used) >= nb:
            return "block id"
        if min(it.token_ids) < 0 or max(it.token_ids) >= vocab:
            return "token id"
    return None


@pytest.mark.parametrize("seed", range(200))
def test_random_batches_are_judged_as_item_by_item(seed):
    # check_batch tests the whole batch with numpy and only walks the items when it fails:
    # random batches, a few of them corrupted, must get the same verdict and message.
    rng = np.random.default_rng(seed)
    limits = dict(block_size=4, num_blocks=int(rng.integers(4, 30)), vocab_size=50,
                  max_model_len=int(rng.integers(25, 60)))  # fmt: skip
    batch = []
    for i in range(int(rng.integers(1, 8))):
        n = int(rng.choice([0, 1, 1, 1, 2, 5])) if rng.random() < 0.2 else 1
        start = int(rng.integers(0, 30))
        blocks = -(-(start + n) // 4) + int(rng.choice([-1] + [0] * 8 + [1] * 3))
        low = -1 if rng.random() < 0.05 else 0
        high = limits["num_blocks"] + (1 if rng.random() < 0.1 else 0)
        table = rng.integers(low, high, max(blocks, 0)).tolist()
        ids = rng.integers(-1 if rng.random() < 0.05 else 0, 51 if rng.random() < 0.05 else 50, n)
        batch.append(BatchItem(seq_id=i, token_ids=ids.astype(np.int32), start_pos=start,
                               block_table=table))  # fmt: skip
    want = item_by_item(batch, limits)
    if want is None:
        check_batch(batch, **limits)
    else:
        with pytest.raises(ValueError, match=want) as err:
            check_batch(batch, **limits)
        first_bad = next(it for it in batch if item_by_item([it], limits))
        assert str(err.value).startswith(f"sequence {first_bad.seq_id}:")
