"""Prefix trie over the tokenised targets of catalogue titles (constrained decoding).

Every inserted sequence is a title's target tokens followed by EOS, and EOS occurs only as
the last token, so a node reached through an EOS edge is a completed title and has no
children. A title that is a prefix of another title ("A" and "A B") is therefore
unambiguous: "A" EOS and "A" "B" EOS are different paths.

Nodes are numbered in insertion order; node 0 is the root (the empty prefix). The same
numbering is used by :meth:`TitleTrie.walk` and :meth:`TitleTrie.to_csr`, so a tensor
engine can step through the CSR arrays and the Python trie interchangeably.
:class:`TrieTensors` holds those arrays on a device and owns the lookup of a batch of
nodes' children, which beam search and greedy decoding step with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

ROOT = 0


@dataclass
class TitleTrie:
    """A set of EOS-terminated token sequences, stored as a trie.

    ``children[n]`` maps a token id to the child node it leads to. Build it with
    :meth:`from_sequences`; the fields are not meant to be filled by hand.
    """

    eos_token_id: int
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    num_sequences: int = 0
    max_length: int = 0  # tokens in the longest sequence, EOS included
    labels: dict[tuple[int, ...], str] = field(default_factory=dict)  # path -> its title

    @classmethod
    def from_sequences(cls, seqs: Iterable[Sequence[int]], eos_token_id: int,
                       labels: Iterable[str] | None = None) -> TitleTrie:
        """Build the trie of ``seqs``; each must be non-empty, end in EOS and hold EOS
        nowhere else. Duplicates are stored once. An empty collection is an error.
        ``labels``: one per sequence, the title it encodes (:meth:`label` maps a complete
        path back to it; of two titles with one path, the first)."""
        trie = cls(eos_token_id=int(eos_token_id))
        inserted_any = False
        names = iter(labels) if labels is not None else None
        for seq in seqs:
            path = trie._insert(seq)
            if names is not None:
                trie.labels.setdefault(path, next(names))
            inserted_any = True
        if not inserted_any:
            raise ValueError("expected at least one sequence, got none")
        return trie

    def label(self, path: Sequence[int]) -> str | None:
        """The title a complete path (EOS included) was built from, or None (a path cut
        short, or a trie built without labels)."""
        return self.labels.get(tuple(int(t) for t in path))

    def _insert(self, seq: Sequence[int]) -> tuple[int, ...]:
        """Add ``seq``; returns it as a tuple of ints (the path's key)."""
        tokens = tuple(int(t) for t in seq)
        if not tokens or tokens[-1] != self.eos_token_id:
            raise ValueError(
                f"expected a sequence ending in eos {self.eos_token_id}, got {list(tokens)}"
            )
        if self.eos_token_id in tokens[:-1]:
            raise ValueError(f"expected eos only as the last token, got {list(tokens)}")
        self.max_length = max(self.max_length, len(tokens))
        node = ROOT
        for token in tokens:
            child = self.children[node].get(token)
            if child is None:
                child = len(self.children)
                self.children.append({})
                self.children[node][token] = child
                if token == self.eos_token_id:
                    self.num_sequences += 1
            node = child
        return tokens

    @property
    def num_nodes(self) -> int:
        return len(self.children)

    def walk(self, node: int, token: int) -> int:
        """The child of ``node`` along ``token``, or -1 when there is no such edge."""
        if not 0 <= node < len(self.children):
            raise ValueError(f"expected a node id in [0, {len(self.children)}), got {node}")
        return self.children[node].get(int(token), -1)

    def node_of(self, prefix: Sequence[int]) -> int:
        """The node reached from the root by ``prefix``, or -1 when it leaves the trie."""
        node = ROOT
        for token in prefix:
            node = self.children[node].get(int(token), -1)
            if node < 0:
                return -1
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Sorted token ids that may follow ``prefix``; empty when ``prefix`` is not in
        the trie or is already a completed sequence."""
        node = self.node_of(prefix)
        return sorted(self.children[node]) if node >= 0 else []

    def contains(self, seq: Sequence[int]) -> bool:
        """True when ``seq`` is one complete inserted sequence (ending in EOS)."""
        return len(seq) > 0 and int(seq[-1]) == self.eos_token_id and self.node_of(seq) >= 0

    def __len__(self) -> int:
        """Number of distinct complete sequences."""
        return self.num_sequences

    def sequences(self) -> Iterator[tuple[int, ...]]:
        """Every distinct complete sequence, in lexicographic token order."""
        stack: list[tuple[int, tuple[int, ...]]] = [(ROOT, ())]
        while stack:
            node, prefix = stack.pop()
            if prefix and prefix[-1] == self.eos_token_id:
                yield prefix
                continue
            for token in sorted(self.children[node], reverse=True):
                stack.append((self.children[node][token], prefix + (token,)))

    def to_csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compressed sparse rows of the edge lists, all int64 on the CPU.

        Returns ``(node_token_offsets [num_nodes + 1], child_tokens [E], child_nodes [E])``:
        the children of node ``n`` are ``child_tokens[offsets[n]:offsets[n + 1]]`` (sorted
        ascending) leading to ``child_nodes[offsets[n]:offsets[n + 1]]``. Node 0 is the root.
        """
        offsets = [0]
        tokens: list[int] = []
        nodes: list[int] = []
        for edges in self.children:
            for token in sorted(edges):
                tokens.append(token)
                nodes.append(edges[token])
            offsets.append(len(tokens))
        return (
            torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(tokens, dtype=torch.int64),
            torch.tensor(nodes, dtype=torch.int64),
        )


@dataclass
class TrieTensors:
    """A :class:`TitleTrie`'s CSR arrays on a device (see :meth:`TitleTrie.to_csr`) and the
    lookup of a batch of nodes' children. A node is an int64 id; -1 stands for off the
    trie, which has no children."""

    offsets: torch.Tensor  # [num_nodes + 1] int64
    child_tokens: torch.Tensor  # [E] int64
    child_nodes: torch.Tensor  # [E] int64
    eos_token_id: int
    max_length: int = 0  # tokens in the trie's longest path, EOS included

    @classmethod
    def from_trie(cls, trie: TitleTrie, vocab_size: int, device: torch.device) -> TrieTensors:
        offsets, tokens, nodes = trie.to_csr()
        if int(tokens.max()) >= vocab_size:
            raise ValueError(f"expected trie token ids below the vocabulary size {vocab_size}, "
                             f"got {int(tokens.max())}")
        return cls(offsets.to(device), tokens.to(device), nodes.to(device), trie.eos_token_id,
                   trie.max_length)

    def children(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The children of ``nodes`` [R] as CSR slices: ``(start, count)``, both [R] int64;
        node ``nodes[r]``'s children are edges ``start[r] .. start[r] + count[r] - 1`` of
        ``child_tokens`` / ``child_nodes``. ``count`` is 0 off the trie."""
        safe = nodes.clamp(min=0)
        start = self.offsets[safe]
        return start, torch.where(nodes >= 0, self.offsets[safe + 1] - start, 0)

    def only_child(self, nodes: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per node of ``nodes`` [R]: ``(count, token, child)``, all [R] int64: how many
        children it has, and where that is exactly one, the edge's token and the child node
        it leads to (-1 in both elsewhere)."""
        start, count = self.children(nodes)
        one = count == 1
        edge = torch.where(one, start, 0)
        return (count, torch.where(one, self.child_tokens[edge], -1),
                torch.where(one, self.child_nodes[edge], -1))

    def expand(self, nodes: torch.Tensor) -> Expansion:
        """Allowed continuations of beams at ``nodes`` [R] (-1 = off the trie).

        A node without children (a finished title) or off the trie allows EOS only,
        leading off the trie. Returns an :class:`Expansion` of shape [R, C], C >= 2.
        """
        start, count = self.children(nodes)
        width = max(2, int(count.max()))
        slot = torch.arange(width, device=nodes.device)
        has_child = slot < count[:, None]  # [R, C]
        edge = torch.where(has_child, start[:, None] + slot, 0)
        eos_only = (count == 0)[:, None] & (slot == 0)
        return Expansion(
            tokens=torch.where(has_child, self.child_tokens[edge], self.eos_token_id),
            nodes=torch.where(has_child, self.child_nodes[edge], -1),
            valid=has_child | eos_only,
        )


@dataclass
class Expansion:
    """Continuations per beam row, padded: ``tokens``, ``nodes`` (the child node, -1 off
    the trie) and ``valid`` (False = padding slot), all [R, C]."""

    tokens: torch.Tensor
    nodes: torch.Tensor
    valid: torch.Tensor
