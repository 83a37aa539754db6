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
