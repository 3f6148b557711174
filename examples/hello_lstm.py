"""The material's first example: an LSTM learns to continue "hello" one character at a time.

Inputs are one-hot vectors over the alphabet h, e, l, o; at each step the network predicts the
next character, so from "hell" it should say "ello".

    python examples/hello_lstm.py
"""

from __future__ import annotations

import torch
from torch import nn

import rnnkit

ALPHABET = "helo"


def one_hot(text: str) -> torch.Tensor:
    """(T, 1, 4): one sequence, one-hot per character."""
    indices = torch.tensor([ALPHABET.index(ch) for ch in text])
    return nn.functional.one_hot(indices, len(ALPHABET)).float().unsqueeze(1)


def main() -> None:
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(input_size=4, hidden_size=8)
    readout = nn.Linear(8, 4)  # o_t = V h_t + c; the softmax is inside the loss
    optimizer = torch.optim.Adam([*lstm.parameters(), *readout.parameters()], lr=0.05)
    inputs, targets = one_hot("hell"), torch.tensor([ALPHABET.index(ch) for ch in "ello"])
    for step in range(1, 101):
        outputs, _ = lstm(inputs)                       # (T, 1, 8)
        logits = readout(outputs.squeeze(1))            # (T, 4)
        loss = nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            predicted = "".join(ALPHABET[i] for i in logits.argmax(1))
            print(f"step {step:3d}  loss {loss.item():.4f}  predicted {predicted!r}")
    probabilities = logits.softmax(1)
    for ch, row in zip("hell", probabilities):
        shown = "  ".join(f"{a}:{p:.2f}" for a, p in zip(ALPHABET, row.tolist()))
        print(f"after {ch!r}: {shown}")


if __name__ == "__main__":
    main()
