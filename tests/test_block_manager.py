"""Block manager: allocation, freeing, and prefix sharing with reference counts."""

from __future__ import annotations

import pytest

from inference_service.engine.block_manager import BlockManager
from inference_service.engine.sequence import Sequence
from inference_service.sampling.params import SamplingParams


def make_seq(seq_id: int, prompt: list[int]) -> Sequence:
    return Sequence(seq_id, prompt, SamplingParams(), max_total_tokens=10_000)


def compute(bm: BlockManager, seq: Sequence, upto: int) -> None:
    """Pretend a step computed seq's tokens up to `upto`."""
    assert bm.grow(seq, upto)
    seq.num_computed_tokens = upto
    bm.register_computed_blocks(seq)


def test_grow_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    seq = make_seq(1, list(range(9)))
    assert bm.grow(seq, 9)
    assert len(seq.block_table) == 3  # ceil(9 / 4)
    assert len(set(seq.block_table)) == 3
    assert bm.num_used_blocks == 3
    assert bm.grow(seq, 12)  # still fits in 3 blocks
    assert bm.num_used_blocks == 3
    assert bm.grow(seq, 13)
    assert bm.num_used_blocks == 4
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_grow_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(1, [1] * 8)
    assert bm.grow(a, 8)
    b = make_seq(2, [2] * 8)
    assert not bm.grow(b, 8)  # needs 2, only 1 free
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_identical_prefix_blocks_are_shared_with_refcounts():
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    a = make_seq(1, prompt)
    bm.admit(a, bm.match_prefix(a))
    assert a.num_computed_tokens == 0  # nothing cached yet
    compute(bm, a, 10)

    b = make_seq(2, prompt + [7, 8])
    match = bm.match_prefix(b)
    assert match.block_ids == a.block_table[:2]  # the two full prompt blocks
    assert bm.prefix_cost(match) == 0  # they are in use, reviving costs no free block
    bm.admit(b, match)
    assert b.num_computed_tokens == 8
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    assert bm.ref_counts[a.block_table[2]] == 1
    assert bm.prefix_cache_hit_blocks == 2
    compute(bm, b, 12)
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared

    # A different prefix shares nothing, even if a later block matches.
    c = make_seq(3, [0, 1, 2, 3] + prompt[4:10])
    assert bm.match_prefix(c).num_blocks == 0

    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_used_blocks == 0
    assert all(r == 0 for r in bm.ref_counts)


def test_freed_prefix_is_revived_until_evicted():
    bs = 4
    bm = BlockManager(num_blocks=4, block_size=bs)
    prompt = list(range(9))
    a = make_seq(1, prompt)
    bm.admit(a, bm.match_prefix(a))
    compute(bm, a, 9)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4

    b = make_seq(2, prompt)
    match = bm.match_prefix(b)
    assert match.block_ids == first_two
    assert bm.prefix_cost(match) == 2  # free blocks coming back into use
    bm.admit(b, match)
    assert b.num_computed_tokens == 8 and bm.num_used_blocks == 2
    bm.free(b)

    # Filling the pool with other tokens overwrites (evicts) the cached blocks.
    c = make_seq(3, [50] * 16)
    compute(bm, c, 16)
    bm.free(c)
    d = make_seq(4, prompt)
    assert bm.match_prefix(d).num_blocks == 0


def test_whole_prompt_cached_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly 2 blocks
    a = make_seq(1, prompt)
    compute(bm, a, 8)
    b = make_seq(2, prompt)
    match = bm.match_prefix(b)
    assert match.num_blocks == 1  # the block holding the last token is recomputed
    bm.admit(b, match)
    assert b.num_uncomputed_tokens == 4


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(1, list(range(9)))
    compute(bm, a, 9)
    assert bm.match_prefix(make_seq(2, list(range(9)))).num_blocks == 0


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(1, [1, 2])
    assert bm.grow(a, 2)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError):
        bm.free(a)
