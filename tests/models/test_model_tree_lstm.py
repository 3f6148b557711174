"""Tree-LSTM: level-by-level batching equals one node at a time; the reader parses SST trees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnkit.data.text import FormatError
from rnnkit.data.trees import Tree, parse_tree, read_trees
from rnnkit.models.tree_lstm import TreeBatch, TreeClassifier, TreeLSTM

SST_TREES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sst-trees" / "train.txt"
TREES = [
    "(3 (2 (2 The) (2 Rock)) (4 (3 (2 is) (4 great)) (2 .)))",
    "(1 bad)",
    "(0 (1 (2 not) (1 (2 very) (3 good))) (2 !))",
]
VOCABULARY = ["The", "Rock", "is", "great", ".", "bad", "not", "very", "good", "!"]
WORDS = {w: i + 1 for i, w in enumerate(VOCABULARY)}


def test_parse_tree_structure_labels_and_spans() -> None:
    tree = parse_tree(TREES[0])
    assert tree.label == 3 and len(tree.children) == 2
    assert parse_tree("(2 8 1\\/2)").word == "8 1\\/2"
    assert tree.leaves() == ["The", "Rock", "is", "great", "."]
    spans = list(tree.spans())
    assert len(spans) == 9 and spans[-1] == (tree.leaves(), 3)
    assert (["is", "great"], 3) in spans


@pytest.mark.parametrize("text", ["(3 (2 a)", "(2 a))", "(x a)", "(2 (1 a) b)", "()"])
def test_malformed_trees_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_tree(text)


def test_read_trees_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TREES[0] + "\n(2 (1 a)\n")
    with pytest.raises(FormatError, match="line 2"):
        read_trees(path)


def test_read_trees_skips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"  # it was "word '\ufeff' outside any node" on line 1
    path.write_text("\ufeff" + TREES[0] + "\n", encoding="utf-8")
    assert read_trees(path) == [parse_tree(TREES[0])]


@pytest.mark.parametrize("form", ["constituency", "childsum"])
def test_level_batching_equals_node_by_node(form: str) -> None:
    torch.manual_seed(0)
    trees = [parse_tree(t) for t in TREES]
    model = TreeClassifier(len(WORDS) + 1, 5, 4, classes=5, form=form).double()
    batch = TreeBatch.build(trees, WORDS)
    h, _ = model.tree(batch, model.embedding(batch.words))
    roots = model.tree.forward_node_by_node(trees, model.embedding, WORDS)
    torch.testing.assert_close(h[batch.roots], torch.stack(roots), rtol=1e-12, atol=1e-12)
    # and a batch of trees equals each tree alone, node for node
    start = 0
    for tree in trees:
        alone = TreeBatch.build([tree], WORDS)
        h_alone, _ = model.tree(alone, model.embedding(alone.words))
        assert alone.labels.sort().values.tolist() == sorted(n.label for n in tree.nodes())
        torch.testing.assert_close(h_alone[alone.roots[0]], h[batch.roots[trees.index(tree)]])
        start += alone.words.numel()
    assert start == batch.words.numel() == sum(batch.sizes)


def test_childsum_takes_any_number_of_children() -> None:
    tree = Tree(2, None, (Tree(1, "a"), Tree(3, "b"), Tree(4, "c")))
    model = TreeLSTM(3, 4, "childsum").double()
    embed = torch.nn.Embedding(4, 3).double()
    words = {"a": 1, "b": 2, "c": 3}
    batch = TreeBatch.build([tree], words)
    h, _ = model(batch, embed(batch.words))
    torch.testing.assert_close(h[batch.roots[0]], model.forward_node_by_node([tree], embed, words)[0])
    with pytest.raises(ValueError, match="childsum"):
        TreeLSTM(3, 4, "constituency")(batch, embed(batch.words))


def test_tree_lstm_gradcheck_float64() -> None:
    torch.manual_seed(1)
    trees = [parse_tree(t) for t in TREES]
    batch = TreeBatch.build(trees, WORDS)
    model = TreeLSTM(3, 2, "constituency").double()
    x = torch.randn(batch.words.numel(), 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in model.named_parameters()]

    def run(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        h, c = torch.func.functional_call(model, dict(zip(names, weights)), (batch, x))
        return torch.cat((h, c), 1)

    weights = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert torch.autograd.gradcheck(run, (x, *weights))


def test_reads_the_shared_sst_trees() -> None:
    if not SST_TREES.is_file():
        pytest.skip(f"{SST_TREES} not present (the shared data sets)")
    trees = read_trees(SST_TREES)
    assert len(trees) == 8544
    assert all(len(node.children) in (0, 2) for tree in trees[:200] for node in tree.nodes())
