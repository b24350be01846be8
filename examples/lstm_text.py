"""A text classifier: Embedding -> LSTM -> Linear on the last hidden state.

(The default sizes keep PyTorch's default LSTM init clear of the 2x
``init_mismatch`` boundary: with ``embed_dim = hidden / 2`` its input-gate
chunks sit at exactly 0.50x Xavier, so a flag would flip with the seed.)

The recurrent model of the "how to initialize an LSTM and an Embedding"
recipe: an ``nn.LSTM`` stores its four gates (input, forget, cell, output)
stacked in one ``weight_ih`` of shape ``(4 * hidden, input)`` and one
``weight_hh``, so a Xavier init applied to the whole matrix computes its fans
from the stacked shape; the recipe instead initializes each gate's ``(hidden,
input)`` chunk on its own. ``init="default"`` keeps PyTorch's init (every LSTM
parameter uniform in ``+-1/sqrt(hidden)``, embedding N(0, 1) with the padding
row zero); ``init="xavier_per_gate"`` applies the recipe, with zero biases
except a forget-gate bias of 1 (Jozefowicz et al. 2015). actstats should
report the LSTM's gate weights per chunk against their Xavier reference, the
embedding (std 1, padding row kept at zero) and the LSTM's tuple output
``(output, (h_n, c_n))``; the tanh-bounded hidden state keeps the signal from
exploding, and the zero-padded batch exercises integer inputs with
``padding_idx``.
"""

from __future__ import annotations

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431

INITS = ("default", "xavier_per_gate")


class LSTMClassifier(nn.Module):
    """Token ids ``(batch, seq_len)`` -> class logits ``(batch, num_classes)``."""

    def __init__(
        self,
        vocab_size: int = 1000,
        embed_dim: int = 96,
        hidden: int = 128,
        num_layers: int = 1,
        num_classes: int = 2,
        init: str = "default",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of: {', '.join(INITS)}")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)
        if init == "xavier_per_gate":
            self._init_xavier_per_gate()

    @torch.no_grad()
    def _init_xavier_per_gate(self) -> None:
        hidden = self.lstm.hidden_size
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight_"):  # weight_ih_l{k}, weight_hh_l{k}
                # Gates are stacked along dim 0 in the order i, f, g, o; each
                # chunk is one (hidden, fan_in) matrix with its own Xavier std
                # sqrt(2 / (hidden + fan_in)).
                for chunk in param.chunk(4, dim=0):
                    nn.init.xavier_normal_(chunk, gain=1.0)
            elif name.startswith("bias_"):
                nn.init.zeros_(param)
        for k in range(self.lstm.num_layers):
            # b_ih and b_hh are added together; set the forget gate in one of
            # them only, so the effective forget bias is 1, not 2.
            getattr(self.lstm, f"bias_ih_l{k}")[hidden : 2 * hidden].fill_(1.0)
        # Embedding: N(0, 1), written out here, with the padding row back at
        # zero, so padding maps to the zero vector (nn.Embedding never updates it).
        self.embedding.weight.normal_(0.0, 1.0)
        self.embedding.weight[self.embedding.padding_idx].zero_()
        nn.init.xavier_normal_(self.head.weight, gain=1.0)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(tokens)  # (batch, seq_len, embed_dim)
        # Trailing padding is run through the LSTM like any token (its
        # embedding is zero); the classic simple model, without packing.
        # The output sequence at the last step equals h_n of the top layer; taking it
        # from `output` keeps the gradient w.r.t. the LSTM's first output measurable.
        output, _ = self.lstm(emb)  # (batch, seq_len, hidden)
        return self.head(output[:, -1])


def build(
    vocab_size: int = 1000,
    embed_dim: int = 96,
    hidden: int = 128,
    num_layers: int = 1,
    seq_len: int = 20,
    batch_size: int = 8,
    init: str = "default",
) -> tuple[LSTMClassifier, torch.Tensor]:
    """Return the classifier and a fixed batch of token ids of shape ``(batch_size, seq_len)``.

    Ids are drawn uniformly from ``[1, vocab_size)``; each sequence has a
    length in ``[seq_len // 2, seq_len]`` (the first always the full length)
    and is padded with 0 after it. Weights come from the global RNG; the batch
    from a private generator.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (id 0 is padding), got {vocab_size}")
    model = LSTMClassifier(vocab_size, embed_dim, hidden, num_layers, init=init)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    tokens = torch.randint(1, vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    tokens[torch.arange(seq_len) >= lengths[:, None]] = 0
    return model, tokens


if __name__ == "__main__":
    net, ids = build(init="xavier_per_gate")
    print(ids[:3])
    print(net(ids).shape)
