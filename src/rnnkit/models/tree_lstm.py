"""Tree-LSTMs (Tai, Socher & Manning 2015): the recursive contrast to sequential recurrence.

A node's state is computed from its children's states instead of the previous step's. With
children ``k = 1 … K`` (states ``h_k, c_k``) and input ``x`` (a word embedding at a leaf, zero at an
inner node of a constituency tree):

Binary (N-ary, N = 2) Tree-LSTM, the constituency form — each child position has its own weights,
so "left" and "right" mean different things::

    i   = σ(W_i x + Σ_l U_i^l h_l + b_i)
    f_k = σ(W_f x + Σ_l U_f^{kl} h_l + b_f)      one forget gate per child
    o   = σ(W_o x + Σ_l U_o^l h_l + b_o)
    u   = tanh(W_u x + Σ_l U_u^l h_l + b_u)
    c   = i ⊙ u + Σ_k f_k ⊙ c_k
    h   = o ⊙ tanh(c)

Child-sum Tree-LSTM — any number of unordered children::

    h̃   = Σ_k h_k
    i   = σ(W_i x + U_i h̃ + b_i)
    f_k = σ(W_f x + U_f h_k + b_f)              one forget gate per child, shared weights
    o   = σ(W_o x + U_o h̃ + b_o)
    u   = tanh(W_u x + U_u h̃ + b_u)
    c   = i ⊙ u + Σ_k f_k ⊙ c_k
    h   = o ⊙ tanh(c)

Execution: a batch of trees is laid out level by level (:class:`TreeBatch`: leaves are level 0, a
node's level is one more than its highest child's), and each level — every node of every tree at
that height — is one batched call of :meth:`TreeLSTM.node_states`. ``forward_node_by_node`` runs
the same math one node at a time: the reference the batching is tested and timed against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnkit.data.trees import Tree

FORMS = ("constituency", "childsum")


@dataclass
class TreeBatch:
    """Trees flattened level by level; node ``n`` of the batch is row ``n`` of every output."""

    words: Tensor  # (N,) word index of each node (0 where it has none)
    has_word: Tensor  # (N,) bool
    labels: Tensor  # (N,) the node's label
    levels: list[tuple[int, int]]  # [start, stop) node range of each level, leaves first
    children: list[Tensor]  # per level: (n_level, K) child node indices (-1: no child)
    roots: Tensor  # (B,) node index of each tree's root
    sizes: list[int]  # nodes per tree

    @classmethod
    def build(cls, trees: Sequence[Tree], word_index: dict[str, int], unknown: int = 0) -> TreeBatch:
        """Lays out ``trees``; words missing from ``word_index`` map to ``unknown``."""
        heights: dict[int, int] = {}
        members: list[list[tuple[Tree, int]]] = []  # per node: (node, tree number)
        for number, tree in enumerate(trees):
            for node in tree.nodes():  # children come before their parent
                height = 1 + max((heights[id(c)] for c in node.children), default=-1)
                heights[id(node)] = height
                while len(members) <= height:
                    members.append([])
                members[height].append((node, number))
        index: dict[int, int] = {}
        order: list[Tree] = []
        levels = []
        for level in members:
            start = len(order)
            for node, _ in level:
                index[id(node)] = len(order)
                order.append(node)
            levels.append((start, len(order)))
        width = max(len(node.children) for node in order) or 1
        children = []
        for start, stop in levels:
            rows = [[index[id(child)] for child in node.children] for node in order[start:stop]]
            children.append(torch.tensor([row + [-1] * (width - len(row)) for row in rows],
                                         dtype=torch.long).view(stop - start, width))
        words = torch.tensor([word_index.get(n.word, unknown) if n.word is not None else 0
                              for n in order], dtype=torch.long)
        return cls(
            words=words,
            has_word=torch.tensor([n.word is not None for n in order]),
            labels=torch.tensor([n.label for n in order], dtype=torch.long),
            levels=levels,
            children=children,
            roots=torch.tensor([index[id(tree)] for tree in trees], dtype=torch.long),
            sizes=[sum(1 for _ in tree.nodes()) for tree in trees],
        )


class TreeLSTM(nn.Module):
    """A Tree-LSTM over word embeddings of size ``input_size``: states (N, H) for every node."""

    def __init__(self, input_size: int, hidden_size: int, form: str = "constituency",
                 arity: int = 2) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        self.input_size, self.hidden_size, self.form, self.arity = input_size, hidden_size, form, arity
        H = hidden_size
        if form == "constituency":
            # gates i, f_1 … f_K, o, u; child l's block of U is columns [l·H, (l+1)·H)
            self.gates = 3 + arity
            self.w = nn.Linear(input_size, self.gates * H)
            self.u = nn.Linear(arity * H, self.gates * H, bias=False)
        else:
            self.w = nn.Linear(input_size, 4 * H)  # i, o, u on x, and f on x
            self.u_iou = nn.Linear(H, 3 * H, bias=False)
            self.u_f = nn.Linear(H, H, bias=False)
        bound = 1.0 / math.sqrt(H)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def node_states(self, x: Tensor, child_h: Tensor, child_c: Tensor, present: Tensor,
                    has_input: bool = True) -> tuple[Tensor, Tensor]:
        """States of n nodes: x (n, I), children (n, K, H) (zeros where absent), present (n, K).

        ``has_input=False`` says every x is zero (inner nodes of a constituency tree): W x is
        then skipped, as U h is where no node has a child (leaves) — each halves the work.
        """
        values = self.node_values(x, child_h, child_c, present, has_input)
        return values["h"], values["c"]

    def node_values(self, x: Tensor, child_h: Tensor, child_c: Tensor, present: Tensor,
                    has_input: bool = True) -> dict[str, Tensor]:
        """:meth:`node_states` with the gates it computes on the way: ``h``, ``c``, ``i``, ``o``,
        ``u`` (n, H) and the forget gates ``f`` (n, K, H), one per child slot (what ``rnnkit
        explore`` shows; a gate of an absent child is computed but multiplies nothing)."""
        n, H = x.shape[0], self.hidden_size
        mask = present.unsqueeze(2).to(x.dtype)  # (n, K, 1)
        if self.form == "constituency" and child_h.shape[1] > self.arity:
            raise ValueError(f"a node has {child_h.shape[1]} children; this Tree-LSTM takes "
                             f"at most {self.arity} (use form='childsum')")
        any_child = bool(present.any())
        wx = self.w(x) if has_input else self.w.bias.expand(n, -1)
        if self.form == "constituency":
            pre = wx  # (n, (3+K)·H)
            if any_child:
                slots = torch.zeros(n, self.arity, H, dtype=x.dtype, device=x.device)
                slots[:, : child_h.shape[1]] = child_h * mask
                pre = pre + self.u(slots.reshape(n, self.arity * H))
            i, o, u = pre[:, :H].sigmoid(), pre[:, -2 * H:-H].sigmoid(), pre[:, -H:].tanh()
            forget = pre[:, H:-2 * H].reshape(n, self.arity, H)[:, : child_h.shape[1]].sigmoid()
        else:
            iou = wx[:, :3 * H]  # (n, 3H)
            if any_child:
                iou = iou + self.u_iou((child_h * mask).sum(1))
            i, o, u = iou[:, :H].sigmoid(), iou[:, H:2 * H].sigmoid(), iou[:, 2 * H:].tanh()
            forget = (wx[:, 3 * H:].unsqueeze(1) + self.u_f(child_h)).sigmoid()  # (n, K, H)
        c = i * u + (forget * child_c * mask).sum(1)
        return {"h": o * torch.tanh(c), "c": c, "i": i, "f": forget, "o": o, "u": u}

    def forward(self, batch: TreeBatch, embedded: Tensor) -> tuple[Tensor, Tensor]:
        """(h, c) of every node (N, H), level by level; ``embedded`` (N, I) holds each node's x."""
        x = embedded * batch.has_word.unsqueeze(1).to(embedded.dtype)
        H = self.hidden_size
        h_done = x.new_zeros(0, H)
        c_done = x.new_zeros(0, H)
        for (start, stop), children in zip(batch.levels, batch.children):
            present = children >= 0
            safe = children.clamp(min=0)
            # pad row: children that do not exist read zeros, and their mask removes them anyway
            child_h = h_done[safe] if h_done.shape[0] else x.new_zeros(*children.shape, H)
            child_c = c_done[safe] if c_done.shape[0] else x.new_zeros(*children.shape, H)
            has_input = bool(batch.has_word[start:stop].any())
            h, c = self.node_states(x[start:stop], child_h, child_c, present, has_input)
            h_done, c_done = torch.cat((h_done, h)), torch.cat((c_done, c))
        return h_done, c_done

    def forward_node_by_node(self, trees: Sequence[Tree], embed: nn.Module,
                             word_index: dict[str, int], unknown: int = 0) -> list[Tensor]:
        """The root h (H,) of each tree, computing one node at a time (the unbatched reference)."""
        roots = []
        for tree in trees:
            states: dict[int, tuple[Tensor, Tensor]] = {}
            for node in tree.nodes():
                if node.word is not None:
                    x = embed(torch.tensor([word_index.get(node.word, unknown)]))
                else:
                    x = self.w.weight.new_zeros(1, self.input_size)
                kids = [states[id(child)] for child in node.children]
                if kids:
                    child_h = torch.stack([k[0] for k in kids], dim=1)  # (1, K, H)
                    child_c = torch.stack([k[1] for k in kids], dim=1)
                else:
                    child_h = child_c = x.new_zeros(1, 1, self.hidden_size)
                present = torch.full((1, child_h.shape[1]), bool(kids))
                states[id(node)] = self.node_states(x, child_h, child_c, present,
                                                    node.word is not None)
            roots.append(states[id(tree)][0][0])
        return roots


class TreeClassifier(nn.Module):
    """Embedding → Tree-LSTM → a softmax over sentiment classes at every node."""

    def __init__(self, vocab_size: int, embedding: int, hidden: int, classes: int,
                 form: str = "constituency", dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding)
        self.tree = TreeLSTM(embedding, hidden, form)
        self.drop = nn.Dropout(dropout)
        self.output = nn.Linear(hidden, classes)

    def forward(self, batch: TreeBatch) -> Tensor:
        """Logits (N, classes) for every node of the batch, in the batch's node order."""
        h, _ = self.tree(batch, self.drop(self.embedding(batch.words)))
        return self.output(self.drop(h))
