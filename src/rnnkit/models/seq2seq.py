"""Many-to-many with Tx ≠ Ty: an encoder RNN reads the source, a decoder RNN writes the target.

    source (S, B) ─embedding─► encoder (bi)RNN ─► outputs (S, B, De), final state
    final state ─bridge (linear + tanh)─► decoder initial state
    decoder, one step per target token (y_0 = <s>), by attention kind:

      none:                x_t = emb(y_{t-1})                h_t = RNN(x_t)   o_t = h_t
      additive (Bahdanau): c_t = attn(h_{t-1}),  x_t = [emb(y_{t-1}); c_t],  h_t = RNN(x_t),
                           o_t = tanh(W_o [h_t; c_t])
      general / dot (Luong, with input feeding):  x_t = [emb(y_{t-1}); o_{t-1}],  h_t = RNN(x_t),
                           c_t = attn(h_t),  o_t = tanh(W_o [h_t; c_t])

      logits_t = W_out o_t      (the query h is the decoder's top layer; o_0 = 0)

Training uses teacher forcing, optionally with scheduled sampling (Bengio et al. 2015): with
probability 1 − ``teacher_forcing`` a token's input is the model's own previous prediction
instead of the reference. Decoding is greedy (batched) or beam search
(:mod:`rnnkit.decoding.beam`, one sentence at a time). Attention weights come back with every
decode for heat maps.

Targets are given without ``<s>`` and ending in ``</s>``: (T, B) padded, with lengths counting
``</s>``. The special ids default to those of :class:`rnnkit.data.text.Vocabulary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.decoding.beam import BeamHypothesis, beam_search
from rnnkit.models.attention import ATTENTIONS, Attention, Memory
from rnnkit.models.classifier import valid_mask
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent, final_hidden
from rnnkit.options import Options, option


@dataclass
class Seq2SeqConfig(Options):
    """Everything needed to rebuild a :class:`Seq2Seq`; JSON-able via ``to_dict``."""

    source_vocab: int = option(0, "source symbols (derived from the data)", ge=0)
    target_vocab: int = option(0, "target symbols (derived from the data)", ge=0)
    embedding: int = option(64, "embedding size of source and target symbols", ge=1)
    attention: str = option("additive", "attention of the decoder over the encoder's outputs",
                            choices=ATTENTIONS)
    attention_size: int = option(0, "additive attention's hidden size; 0: the decoder's", ge=0)
    dropout: float = option(0.0, "dropout on embeddings and decoder outputs", ge=0, lt=1)
    pad: int = option(0, "padding id", ge=0)
    bos: int = option(2, "beginning-of-sentence id", ge=0)
    eos: int = option(3, "end-of-sentence id", ge=0)
    encoder: RecurrentConfig = option(
        help="the encoder's recurrent stack",
        factory=lambda: RecurrentConfig(layers=1, hidden=64, bidirectional=True))
    decoder: RecurrentConfig = option(help="the decoder's recurrent stack",
                                      factory=lambda: RecurrentConfig(layers=1, hidden=64))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source_vocab <= 0 or self.target_vocab <= 0:
            raise ValueError("source_vocab and target_vocab must be positive")
        if self.decoder.bidirectional:
            raise ValueError("the decoder generates left to right: it cannot be bidirectional")


@dataclass
class DecoderState:
    """What the decoder carries from step to step, batch rows on dim 1 (hidden) / 0 (feed)."""

    hidden: tuple[Tensor, ...]  # (L, N, H) each: (h,) or (h, c)
    feed: Tensor | None  # (N, H) previous attentional vector (Luong input feeding), else None
    memory: Memory | None  # encoder outputs prepared for attention

    def select(self, index: Tensor) -> DecoderState:
        return DecoderState(
            tuple(h[:, index] for h in self.hidden),
            self.feed[index] if self.feed is not None else None,
            self.memory.select(index) if self.memory is not None else None,
        )


@dataclass
class Decoded:
    tokens: list[list[int]]  # per sentence, without </s>
    log_probs: list[float]  # Σ log P of the tokens (+ </s> when finished), per sentence
    attention: Tensor | None  # (T_out, B, S) weights per output step, None without attention


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        dec = config.decoder
        self.source_embedding = nn.Embedding(config.source_vocab, config.embedding, padding_idx=config.pad)
        self.target_embedding = nn.Embedding(config.target_vocab, config.embedding, padding_idx=config.pad)
        self.encoder = build_recurrent(config.encoder, config.embedding)
        enc_size = config.encoder.output_size
        self.num_states = 2 if dec.cell == "lstm" else 1
        self.bridge = nn.Linear(enc_size, dec.layers * dec.hidden * self.num_states)
        kind = config.attention
        extra = {"none": 0, "additive": enc_size}.get(kind, dec.hidden)  # context or input feed
        self.decoder = build_recurrent(dec, config.embedding + extra)
        self.attention = (Attention(kind, dec.hidden, enc_size, config.attention_size)
                          if kind != "none" else None)
        self.combine = nn.Linear(dec.hidden + enc_size, dec.hidden) if kind != "none" else None
        self.drop = nn.Dropout(config.dropout)
        self.output = nn.Linear(dec.hidden, config.target_vocab)

    # --- encoder ---------------------------------------------------------------------------

    def encode(self, source: Tensor, source_lengths: Tensor) -> DecoderState:
        """source (S, B), lengths (B,) → the decoder's initial state."""
        source_lengths = torch.as_tensor(source_lengths, dtype=torch.int64)
        x = self.drop(self.source_embedding(source))  # (S, B, E)
        outputs, state = self.encoder(x, lengths=source_lengths)  # (S, B, De)
        summary = final_hidden(state, self.config.encoder.bidirectional)  # (B, De)
        dec = self.config.decoder
        batch = source.shape[1]
        init = torch.tanh(self.bridge(summary))  # (B, n·L·H)
        init = init.view(batch, self.num_states, dec.layers, dec.hidden).permute(1, 2, 0, 3)  # (n, L, B, H)
        hidden = tuple(s.contiguous() for s in init)
        memory = feed = None
        if self.attention is not None:
            memory = self.attention.prepare(outputs, valid_mask(source_lengths.to(source.device),
                                                                source.shape[0]))
            if self.config.attention != "additive":
                feed = outputs.new_zeros(batch, dec.hidden)  # (B, H): o_0 = 0
        return DecoderState(hidden, feed, memory)

    # --- one decoder step ------------------------------------------------------------------

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, Tensor | None, DecoderState]:
        """Previous tokens (N,) → logits (N, V), attention weights (N, S) or None, next state."""
        x = self.drop(self.target_embedding(tokens))  # (N, E)
        kind = self.config.attention
        weights = None
        hx: Any = state.hidden[0] if self.num_states == 1 else state.hidden
        if kind == "additive":
            assert self.attention is not None and state.memory is not None and self.combine is not None
            context, weights = self.attention(state.hidden[0][-1], state.memory)  # (N, De), (N, S)
            x = torch.cat((x, context), dim=1)  # (N, E + De)
        elif kind != "none":
            assert state.feed is not None
            x = torch.cat((x, state.feed), dim=1)  # (N, E + H)
        out, new = self.decoder(x.unsqueeze(0), hx)  # (1, N, H)
        h = out[0]  # (N, H)
        hidden = (new,) if self.num_states == 1 else tuple(new)
        feed = None
        if kind == "none":
            o = h
        else:
            assert self.attention is not None and state.memory is not None and self.combine is not None
            if kind != "additive":
                context, weights = self.attention(h, state.memory)  # (N, De), (N, S)
            o = torch.tanh(self.combine(torch.cat((h, context), dim=1)))  # (N, H)
            feed = o if kind != "additive" else None
        logits = self.output(self.drop(o))  # (N, V)
        return logits, weights, DecoderState(hidden, feed, state.memory)

    # --- training --------------------------------------------------------------------------

    def decoder_inputs(self, target: Tensor) -> Tensor:
        """Targets (T, B) (ending in </s>) → decoder inputs (T, B): <s> then target[:-1]."""
        bos = target.new_full((1, target.shape[1]), self.config.bos)
        return torch.cat((bos, target[:-1]), dim=0)

    def forward(self, source: Tensor, source_lengths: Tensor, target: Tensor,
                teacher_forcing: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """Logits (T, B, V) for each target position, attention weights (T, B, S) or None.

        ``teacher_forcing`` < 1 is scheduled sampling: each input token is, with probability
        1 − teacher_forcing, the model's previous argmax instead of the reference.
        """
        if not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing must be a probability, got {teacher_forcing}")
        state = self.encode(source, source_lengths)
        inputs = self.decoder_inputs(target)  # (T, B)
        if self.attention is None and teacher_forcing == 1.0:
            # nothing feeds back between steps: one layer call over all steps (fast kernels)
            hx: Any = state.hidden[0] if self.num_states == 1 else state.hidden
            outputs, _ = self.decoder(self.drop(self.target_embedding(inputs)), hx)  # (T, B, H)
            return self.output(self.drop(outputs)), None
        steps_logits, steps_weights = [], []
        previous: Tensor | None = None
        for t in range(inputs.shape[0]):
            tokens = inputs[t]  # (B,)
            if previous is not None and teacher_forcing < 1.0:
                # one coin per token and sentence; the model's prediction carries no gradient
                own = previous.argmax(-1).detach()
                coin = torch.rand(tokens.shape, device=tokens.device) >= teacher_forcing
                tokens = torch.where(coin, own, tokens)
            logits, weights, state = self.step(tokens, state)
            steps_logits.append(logits)
            if weights is not None:
                steps_weights.append(weights)
            previous = logits
        attention = torch.stack(steps_weights) if steps_weights else None
        return torch.stack(steps_logits), attention  # (T, B, V), (T, B, S)

    def loss(self, source: Tensor, source_lengths: Tensor, target: Tensor, target_lengths: Tensor,
             teacher_forcing: float = 1.0) -> Tensor:
        """Cross-entropy per target token (</s> included), averaged over the batch's tokens."""
        logits, _ = self(source, source_lengths, target, teacher_forcing)
        mask = valid_mask(torch.as_tensor(target_lengths).to(target.device), target.shape[0])  # (T, B)
        return F.cross_entropy(logits[mask], target[mask])

    @torch.no_grad()
    def sequence_log_prob(self, source: Tensor, source_lengths: Tensor, target: Tensor,
                          target_lengths: Tensor) -> Tensor:
        """log P(target | source) per sentence (B,), target ending in </s>, teacher-forced."""
        logits, _ = self(source, source_lengths, target)
        picked = logits.log_softmax(-1).gather(2, target.unsqueeze(2)).squeeze(2)  # (T, B)
        mask = valid_mask(torch.as_tensor(target_lengths).to(target.device), target.shape[0])
        return (picked * mask).sum(0)

    # --- decoding --------------------------------------------------------------------------

    @torch.no_grad()
    def greedy(self, source: Tensor, source_lengths: Tensor, max_length: int = 100) -> Decoded:
        """Batched greedy decoding: the most likely token each step until </s> or max_length."""
        state = self.encode(source, source_lengths)
        batch = source.shape[1]
        tokens = torch.full((batch,), self.config.bos, dtype=torch.int64, device=source.device)
        done = torch.zeros(batch, dtype=torch.bool, device=source.device)
        log_probs = torch.zeros(batch, dtype=torch.float64)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        weights_steps = []
        for _ in range(max_length):
            logits, weights, state = self.step(tokens, state)
            value, tokens = logits.log_softmax(-1).max(-1)  # (B,) each
            log_probs += torch.where(done.cpu(), 0.0, value.double().cpu())
            if weights is not None:
                weights_steps.append(weights.masked_fill(done.unsqueeze(1), 0.0))
            for b, (token, finished) in enumerate(zip(tokens.tolist(), done.tolist())):
                if not finished and token != self.config.eos:
                    outputs[b].append(token)
            done |= tokens == self.config.eos
            if bool(done.all()):
                break
        attention = torch.stack(weights_steps) if weights_steps else None
        return Decoded(outputs, log_probs.tolist(), attention)

    @torch.no_grad()
    def beam(self, source: Tensor, source_lengths: Tensor, beam_width: int = 5, max_length: int = 100,
             nbest: int = 1, length_norm: str = "none", alpha: float = 0.6) -> list[list[BeamHypothesis]]:
        """The ``nbest`` hypotheses per sentence, best first (see :func:`beam_search`)."""
        results = []
        lengths = torch.as_tensor(source_lengths, dtype=torch.int64).tolist()
        for b, length in enumerate(lengths):
            state = self.encode(source[:length, b: b + 1], torch.tensor([length]))

            def step(tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
                logits, _, state = self.step(tokens, state)
                return logits.log_softmax(-1), state

            results.append(beam_search(
                step, state, DecoderState.select, self.config.bos, self.config.eos, beam_width,
                max_length, nbest, length_norm, alpha))
        return results

    @torch.no_grad()
    def attention_map(self, source: Tensor, tokens: list[int]) -> Tensor | None:
        """Attention weights (len(tokens) + 1, S) of one source (S,) producing ``tokens`` + </s>.

        Beam search keeps no per-hypothesis weights; re-running the chosen output teacher-forced
        gives exactly the weights the search saw.
        """
        target = torch.tensor([*tokens, self.config.eos], dtype=torch.int64).unsqueeze(1)  # (T, 1)
        _, weights = self(source.unsqueeze(1), torch.tensor([source.shape[0]]), target)
        return weights[:, 0] if weights is not None else None
