"""A step's packed batch: positions, cache rows, attention groups and masks, by hand."""

from types import SimpleNamespace

import torch

from loraflow.serve.bank import AdapterBank, BankedLinear
from loraflow.serve.packing import pack


def request(ids, computed, blocks, slot=-1):
    return SimpleNamespace(ids=ids, computed=computed, n_tokens=len(ids), blocks=blocks, slot=slot)


def test_a_decode_and_a_prompt_chunk_pack_into_two_groups():
    bank = AdapterBank(torch.nn.Sequential(BankedLinear(4, 4, False)), n_slots=2, r_max=2)
    decode = request([5, 6, 7, 8, 9], computed=4, blocks=[3, 1])  # 1 new token at position 4
    chunk = request([1, 2, 3, 4, 5, 6], computed=2, blocks=[0, 2])  # 3 of 4 remaining prompt tokens
    batch, sample_from = pack(
        [(decode, 1), (chunk, 3)], bank, block_size=4, zero_row=99, device="cpu", dtype=torch.float32
    )
    assert batch.tokens.tolist() == [9, 3, 4, 5]
    assert batch.positions.tolist() == [4, 2, 3, 4]
    assert batch.cache_index.tolist() == [1 * 4 + 0, 0 * 4 + 2, 0 * 4 + 3, 2 * 4 + 0]  # block table row, offset
    assert batch.logit_index.tolist() == [0] and sample_from == [decode]  # the chunk's prompt is not done
    d, c = batch.groups
    assert d.tokens.tolist() == [0] and d.q_index.tolist() == [[0]]
    assert d.kv_index.tolist() == [[12, 13, 14, 15, 4]]  # its 5 cached positions, the longest context
    assert d.mask[0, 0].tolist() == [[True] * 5]
    assert c.tokens.tolist() == [1, 2, 3] and c.q_index.tolist() == [[1, 2, 3]]
    assert c.kv_index.tolist() == [[0, 1, 2, 3, 8]]
    assert c.mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # causal
    assert c.out_index.tolist() == [0, 1, 2]


def test_padded_context_reads_the_zero_row_not_another_requests_stale_rows():
    bank = AdapterBank(torch.nn.Sequential(BankedLinear(4, 4, False)), n_slots=2, r_max=2)
    short = request([1, 2, 3], computed=0, blocks=[5])  # 3 positions
    long = request([1, 2, 3, 4, 5, 6], computed=0, blocks=[0, 2])  # 6 positions
    batch, _ = pack([(short, 3), (long, 6)], bank, block_size=4, zero_row=99, device="cpu", dtype=torch.float32)
    (g,) = batch.groups
    assert g.kv_index.tolist() == [[20, 21, 22, 99, 99, 99], [0, 1, 2, 3, 8, 9]]
