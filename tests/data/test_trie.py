"""TitleTrie: reachability, completeness, prefix titles, CSR export."""

from __future__ import annotations

import random

import pytest
import torch

from fastlatent.data.trie import ROOT, TitleTrie, TrieTensors

EOS = 2
# "A" (7) is a full title and also the start of "A B" (7 8) and "A B C" (7 8 9).
TITLES = [
    (7, EOS),
    (7, 8, EOS),
    (7, 8, 9, EOS),
    (7, 5, EOS),
    (11, 12, 13, 14, EOS),
    (11, 12, EOS),
    (3, EOS),
    (7, 8, EOS),  # duplicate
]
DISTINCT = sorted(set(TITLES))


@pytest.fixture
def trie() -> TitleTrie:
    return TitleTrie.from_sequences(TITLES, eos_token_id=EOS)


def test_len_counts_distinct_sequences(trie):
    assert len(trie) == 7
    assert trie.max_length == 5
    assert sorted(trie.sequences()) == DISTINCT
    assert list(trie.sequences()) == DISTINCT  # lexicographic order


def test_every_sequence_reachable_token_by_token(trie):
    for seq in DISTINCT:
        node = ROOT
        for i, token in enumerate(seq):
            assert token in trie.allowed(seq[:i]), (seq, i)
            node = trie.walk(node, token)
            assert node > 0
        assert trie.children[node] == {}  # completed node: nothing follows EOS
        assert trie.allowed(seq) == []
        assert trie.contains(seq)


def test_allowed_at_hand_picked_prefixes(trie):
    assert trie.allowed(()) == [3, 7, 11]
    assert trie.allowed((7,)) == [EOS, 5, 8]
    assert trie.allowed((7, 8)) == [EOS, 9]
    assert trie.allowed((11,)) == [12]
    assert trie.allowed((11, 12)) == [EOS, 13]
    assert trie.allowed((8,)) == []  # not a prefix
    assert trie.allowed((7, 8, 9, EOS, 1)) == []  # runs past a completed title


def test_prefix_title_and_longer_title_are_distinct(trie):
    assert trie.contains((7, EOS))
    assert trie.contains((7, 8, EOS))
    assert not trie.contains((7,))  # a prefix is not a complete title
    assert not trie.contains((7, 8))
    assert not trie.contains((11, 12, 13, EOS))  # stray EOS inside a longer title
    assert not trie.contains(())


def test_random_walks_only_produce_inserted_sequences(trie):
    rng = random.Random(0)
    produced = set()
    for _ in range(500):
        prefix: tuple[int, ...] = ()
        while not prefix or prefix[-1] != EOS:
            options = trie.allowed(prefix)
            assert options, prefix
            prefix += (rng.choice(options),)
        produced.add(prefix)
    assert produced == set(DISTINCT)


def test_walk_absent_edge_and_bad_node(trie):
    assert trie.walk(ROOT, 99) == -1
    assert trie.node_of((7, 99)) == -1
    with pytest.raises(ValueError, match="expected a node id"):
        trie.walk(trie.num_nodes, 7)


def test_csr_agrees_with_allowed_on_every_node(trie):
    offsets, tokens, nodes = trie.to_csr()
    assert offsets.dtype == tokens.dtype == nodes.dtype == torch.int64
    assert offsets.shape == (trie.num_nodes + 1,)
    assert offsets[0] == 0 and offsets[-1] == tokens.numel() == nodes.numel()
    assert tokens.numel() == trie.num_nodes - 1  # a tree: one edge into every non-root node
    # Every node's children, reached through the CSR, match allowed() on that node's prefix.
    prefix_of = {ROOT: ()}
    for node in range(trie.num_nodes):
        lo, hi = offsets[node].item(), offsets[node + 1].item()
        assert tokens[lo:hi].tolist() == trie.allowed(prefix_of[node])
        for token, child in zip(tokens[lo:hi].tolist(), nodes[lo:hi].tolist(), strict=True):
            assert trie.walk(node, token) == child
            prefix_of[child] = prefix_of[node] + (token,)
    assert len(prefix_of) == trie.num_nodes


def test_tensor_child_lookup_agrees_with_the_trie_on_every_node(trie):
    # Every node (the last one numbered is a title's end, whose CSR slice starts past the
    # last edge) and -1 (off the trie), in one batch.
    trie_t = TrieTensors.from_trie(trie, vocab_size=16, device=torch.device("cpu"))
    assert int(trie_t.offsets[-2]) == trie_t.child_tokens.numel()
    nodes = torch.tensor([*range(trie.num_nodes), -1])
    children = [*trie.children, {}]  # off the trie: no children
    start, count = trie_t.children(nodes)
    assert count.tolist() == [len(c) for c in children]
    for n, (lo, k) in enumerate(zip(start.tolist(), count.tolist(), strict=True)):
        assert trie_t.child_tokens[lo:lo + k].tolist() == sorted(children[n])
        assert trie_t.child_nodes[lo:lo + k].tolist() == [children[n][t]
                                                          for t in sorted(children[n])]
    count, token, child = trie_t.only_child(nodes)
    assert token.tolist() == [next(iter(c)) if len(c) == 1 else -1 for c in children]
    assert child.tolist() == [next(iter(c.values())) if len(c) == 1 else -1
                              for c in children]
    exp = trie_t.expand(nodes)  # [R, C]: the children, or EOS alone leading off the trie
    for n, c in enumerate(children):
        valid = exp.valid[n]
        expected = sorted(c.items()) if c else [(EOS, -1)]
        assert list(zip(exp.tokens[n][valid].tolist(), exp.nodes[n][valid].tolist(),
                        strict=True)) == expected


def test_tensor_trie_rejects_tokens_outside_the_vocabulary(trie):
    with pytest.raises(ValueError, match="below the vocabulary size 14"):
        TrieTensors.from_trie(trie, vocab_size=14, device=torch.device("cpu"))


def test_token_ids_from_tensors_are_normalised():
    trie = TitleTrie.from_sequences([torch.tensor([4, 5, EOS])], eos_token_id=EOS)
    assert trie.allowed(torch.tensor([4])) == [5]
    assert trie.contains(torch.tensor([4, 5, EOS]))
    assert list(trie.sequences()) == [(4, 5, EOS)]


@pytest.mark.parametrize(
    "bad",
    [[(4, 5)], [()], [(4, EOS, 5, EOS)], []],
    ids=["no-eos", "empty-seq", "eos-inside", "no-sequences"],
)
def test_rejects_malformed_input(bad):
    with pytest.raises(ValueError, match="expected"):
        TitleTrie.from_sequences(bad, eos_token_id=EOS)
