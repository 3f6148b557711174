"""The explorer page of the trees task: a Tree-LSTM's per-node states and gates, and a sequence
encoder of the same task read as a classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from explore_helpers import SST_TREES, train_trees

from rnnkit.data.trees import parse_tree
from rnnkit.explore.analysis import InputError, load_run
from rnnkit.models.tree_lstm import TreeBatch
from rnnkit.tasks import trees

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _batch_order(tree: trees.Tree) -> list[int]:
    """Where each post-order node sits in a TreeBatch of ``tree`` alone: level by level (leaves
    first, a node one above its highest child), post-order within a level."""
    height: dict[int, int] = {}
    nodes = list(tree.nodes())
    for node in nodes:
        height[id(node)] = 1 + max((height[id(c)] for c in node.children), default=-1)
    by_level = sorted(range(len(nodes)), key=lambda k: height[id(nodes[k])])
    return [by_level.index(k) for k in range(len(nodes))]


def test_tree_lstm_nodes_states_gates_and_sentiment(tmp_path: Path) -> None:
    explorer = load_run(train_trees(tmp_path / "run"))
    assert explorer.default_input() == SST_TREES[0]  # the first dev tree, as written
    text = SST_TREES[2]  # (3 (2 (2 a) (3 lovely)) (2 (2 film) (2 .)))
    analysis = explorer.analyse(text)
    p = analysis.predictions
    assert analysis.symbols == ["a", "lovely", "⟨a lovely⟩", "film", ".", "⟨film .⟩",
                                "⟨a lovely film .⟩"]
    assert [n["children"] for n in p["nodes"]] == [[], [], [0, 1], [], [], [3, 4], [2, 5]]
    assert [n["reference"] for n in p["nodes"]] == [
        "neutral (not scored)", "positive", "neutral (not scored)", "neutral (not scored)",
        "neutral (not scored)", "neutral (not scored)", "positive"]
    assert p["root"] == 6 and p["labels"] == ["negative", "positive"]
    # the recorded states are the batched Tree-LSTM's, node for node
    model, vocab = explorer.model, explorer.vocab
    tree = trees.relabel(parse_tree(text), explorer.data)
    batch = TreeBatch.build([tree], vocab.index, vocab.unk)
    order = _batch_order(tree)
    with torch.no_grad():
        h, c = model.tree(batch, model.embedding(batch.words))
        probs = torch.softmax(model(batch).double(), -1)
    torch.testing.assert_close(analysis.values(0, "h"), h[order])
    torch.testing.assert_close(analysis.values(0, "c"), c[order])
    torch.testing.assert_close(torch.tensor(p["probabilities"], dtype=torch.float64), probs[order],
                               rtol=1e-5, atol=1e-6)
    # the root's gates as the module docstring writes them: i, f_1, f_2, o, u from W x + U [h_l; h_r]
    cell, H = model.tree, model.tree.hidden_size
    with torch.no_grad():
        pre = cell.w.bias + cell.u(torch.cat((h[order[2]], h[order[5]])))
    gates = {"i": pre[:H].sigmoid(), "f1": pre[H:2 * H].sigmoid(), "f2": pre[2 * H:3 * H].sigmoid(),
             "o": pre[3 * H:4 * H].sigmoid(), "u": pre[4 * H:].tanh()}
    for name, value in gates.items():
        torch.testing.assert_close(analysis.values(0, name)[6], value)
    assert analysis.values(0, "f1")[:2].isnan().all()  # leaves have no children
    info = analysis.trace_info()[0]
    assert info["name"] == "tree layer 0 bottom-up" and info["gates"] == ["i", "f1", "f2", "o"]
    # plain words: a right-branching tree, no labels; an unknown word shows as what the model reads
    plain = explorer.analyse("the film is great")
    assert plain.symbols[-1] == "⟨the film is great⟩" and not plain.predictions["labelled"]
    assert explorer.analyse("the zebra").symbols == [
        "the", "<unk>", "⟨the zebra⟩"]
    assert plain.predictions["nodes"][-1]["children"] == [0, 5]
    for bad, message in (("(3 (2 a) (3 lovely)", "does not close"), ("(x a)", "integer label"),
                         ("  ", "empty")):
        with pytest.raises(InputError, match=message):
            explorer.analyse(bad)


def test_tree_values_are_served_and_saved(tmp_path: Path) -> None:
    """The per-child forget gates (f1, f2) reach the page: served by name, embedded in --html."""
    import json
    from urllib.request import urlopen

    from rnnkit.explore.server import serve, write_html

    pytest.importorskip("plotly", reason="the page needs plotly.js (the explore extra)")
    explorer = load_run(train_trees(tmp_path / "run"))
    server = serve(explorer)
    try:
        with urlopen(server.url + "api/default") as response:
            summary = json.load(response)
        with urlopen(server.url + f"api/values/{summary['id']}/0/f2") as response:
            served = torch.frombuffer(bytearray(response.read()), dtype=torch.float32)
    finally:
        server.shutdown()
        server.server_close()
    expected = explorer.analyse(SST_TREES[0]).values(0, "f2").flatten()
    torch.testing.assert_close(served, expected, equal_nan=True)
    page = write_html(explorer, SST_TREES[1], tmp_path / "tree.html").read_text(encoding="utf-8")
    assert '"0/f1"' in page and '"0/f2"' in page and '"kind":"tree"' in page


def test_a_sequence_encoder_of_the_trees_task_gets_the_classifier_page(tmp_path: Path) -> None:
    explorer = load_run(train_trees(tmp_path / "run", encoder="gru"))
    analysis = explorer.analyse(SST_TREES[1])
    p = analysis.predictions
    assert p["kind"] == "classes" and analysis.symbols == ["the", "plot", "is", "dull"]
    expected = torch.softmax(trees.sentence_logits(
        explorer.model, [parse_tree(SST_TREES[1])], explorer.vocab, 4).double(), -1)[0]
    assert p["final"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert p["probabilities"][-1] == pytest.approx(expected.tolist(), rel=1e-5)
