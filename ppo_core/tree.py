"""The prompt tree: the token sequences of a rollout packed into one sequence in which each token attends only to its
ancestors (a 4-D attention mask; position ids = depth), so that a token shared by several sequences goes through the
backbone once, forward and backward.

A node is (parent, token); a sequence is a path from a root. Nodes are numbered in insertion order, which is also
their order in the packed sequence, so a parent always comes before its children. `compute()` runs the nodes that
have no hidden state yet through the backbone, attending to the key/value cache of the nodes computed before (under
the same weights: the owner clears the tree when the weights change). Within an episode the prompts grow one tree:
a later sampling call computes only what the tree does not hold yet, and a multi-token answer appends children.
With gradients enabled the cache keeps its graph, and the update backpropagates once through the whole tree.

Gemma-2 and other models with sliding-window layers get a second mask for those layers, in which an ancestor more
than `sliding_window` positions up the path is not visible, as in the unpacked sequence. A model that cannot take a
4-D mask fails `PolicyModel.tree_supported` and keeps the padded path.
"""

from __future__ import annotations

import numpy as np
import torch


class PromptTree:
    """A prefix tree of token sequences with the hidden states (and key/value cache) of its computed nodes."""

    def __init__(self, policy, *, keep_cache: bool = True):
        """keep_cache: keep the key/value cache so that later nodes can attend to the computed ones (a tree that is
        computed once, e.g. a batch of whole sequences, needs none)."""
        self.policy, self.keep_cache = policy, keep_cache
        self.children: dict[tuple[int, int], int] = {}
        self.parent: list[int] = []
        self.token: list[int] = []
        self.depth: list[int] = []
        self._ancestors = np.zeros((0, 0), dtype=bool)  # [capacity, capacity]; row n = n's path (itself included)
        self.computed = 0
        self.cache = None
        self._hidden: list[torch.Tensor] = []           # [n_i, H] chunks, in node order
        self._hidden_cat: torch.Tensor | None = None
        self._view = _UNSET  # the adapter (None: the reference) the computed nodes were computed with

    def __len__(self) -> int:
        return len(self.token)

    # ------------------------------------------------------------------------------------------------ structure
    def insert(self, tokens, parent: int = -1) -> list[int]:
        """The nodes of `tokens` below `parent` (-1: from a root), adding the ones the tree lacks."""
        path = []
        for token in tokens:
            token = int(token)
            node = self.children.get((parent, token))
            if node is None:
                node = self._add(parent, token)
            path.append(node)
            parent = node
        return path

    def _add(self, parent: int, token: int) -> int:
        node = len(self.token)
        if node == len(self._ancestors):
            grown = np.zeros((max(64, 2 * node),) * 2, dtype=bool)
            grown[:node, :node] = self._ancestors
            self._ancestors = grown
        if parent >= 0:
            self._ancestors[node] = self._ancestors[parent]
        self._ancestors[node, node] = True
        self.children[parent, token] = node
        self.parent.append(parent)
        self.token.append(token)
        self.depth.append(self.depth[parent] + 1 if parent >= 0 else 0)
        return node

    @property
    def pending(self) -> int:
        """Nodes without a hidden state yet."""
        return len(self.token) - self.computed

    # ---------------------------------------------------------------------------------------------- computing
    def compute(self, max_tokens: int | None = None) -> int:
        """Run the pending nodes through the backbone (in passes of at most max_tokens nodes, each attending to the
        cache of the nodes before it); returns the number of nodes computed."""
        done = 0
        while self.pending:
            if self.computed and not self.keep_cache:
                raise RuntimeError("this tree keeps no cache: compute all of its nodes in one pass")
            n = self.pending if max_tokens is None or not self.keep_cache else min(self.pending, max_tokens)
            self._pass(self.computed, self.computed + n)
            done += n
        return done

    def _pass(self, lo: int, hi: int) -> None:
        view = self.policy.active_view
        if self._view is not _UNSET and view != self._view:
            raise RuntimeError(f"this prompt tree was computed with {_view_name(self._view)}; extending it with "
                               f"{_view_name(view)} would mix two policies' states: use one tree per adapter")
        self._view = view
        device = self.policy.device
        ids = torch.tensor(self.token[lo:hi], device=device)[None]
        depth = np.asarray(self.depth[:hi])
        positions = torch.from_numpy(depth[lo:hi]).to(device)[None]
        visible = self._ancestors[lo:hi, :hi]
        masks = {"full_attention": visible}
        window = self.policy.sliding_window
        if window is not None:
            masks["sliding_attention"] = visible & (depth[lo:hi, None] - depth[None, :] < window)
        masks = {kind: torch.from_numpy(m).to(device) for kind, m in masks.items()}
        if self.keep_cache and self.cache is None:
            from transformers import DynamicCache
            self.cache = DynamicCache()  # full-length layers: sliding windows are in the mask, never in the cache
        hidden = self.policy.packed_hidden_states(ids, masks, positions, self.cache if self.keep_cache else None)
        self._hidden.append(hidden[0])
        self._hidden_cat = None
        self.computed = hi

    def hidden(self, nodes) -> torch.Tensor:
        """Final hidden states of computed nodes. -> [len(nodes), H] (with graph when computed with grad)."""
        if self._hidden_cat is None:
            self._hidden_cat = self._hidden[0] if len(self._hidden) == 1 else torch.cat(self._hidden)
        return self._hidden_cat[torch.as_tensor(list(nodes), device=self._hidden_cat.device, dtype=torch.long)]


_UNSET = object()


def _view_name(view: str | None) -> str:
    return "the reference (adapters off)" if view is None else f"adapter {view!r}"


def tree_size(sequences: list[tuple[int, ...]]) -> list[int]:
    """Nodes each sequence adds to a tree of the sequences before it, for lexicographically sorted sequences:
    its length minus its longest common prefix with its predecessor."""
    sizes, previous = [], ()
    for seq in sequences:
        common = 0
        for a, b in zip(seq, previous):
            if a != b:
                break
            common += 1
        sizes.append(len(seq) - common)
        previous = seq
    return sizes


def subtree_chunks(sequences: list[tuple[int, ...]], max_tokens: int | None, extra: int = 0) -> list[list[int]]:
    """Indices of lexicographically sorted `sequences` grouped into consecutive chunks whose trees have at most
    max_tokens nodes (a sequence longer than that gets a chunk of its own): shared prefixes stay together, and a
    tree that does not fit is split, never truncated. extra: nodes each distinct sequence adds below its end (e.g.
    drafted answers)."""
    if max_tokens is None:
        return [list(range(len(sequences)))] if sequences else []
    chunks, size = [], 0
    for i, (seq, new) in enumerate(zip(sequences, tree_size(sequences))):
        new += extra if new else 0
        if chunks and size + new <= max_tokens:
            chunks[-1].append(i)
            size += new
        else:
            chunks.append([i])
            size = len(seq) + extra
    return chunks
