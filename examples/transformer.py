"""A small pre-LN transformer encoder over token ids, called with keyword inputs.

Token embedding plus a learned positional embedding, ``nn.TransformerEncoder``
layers with ``norm_first=True`` (the pre-LayerNorm arrangement of Xiong et al.
2020, whose residual stream is never normalized in place, so the signal
neither vanishes nor explodes with depth), a final LayerNorm and a Linear
head. Everything keeps PyTorch's own initialization: embeddings N(0, 1),
attention in-projections Xavier-uniform, other Linears
``kaiming_uniform_(a=sqrt(5))`` -- which puts the feed-forward ``linear1``,
followed by ReLU, at 0.41x He, and the remaining Linears at 0.5-0.65x Xavier.
It is a reference network (no ``vanishing`` or ``exploding`` flag expected:
the residual stream stays at rms ~1.5 after two layers), and it exercises
three things: dict inputs (``{"tokens": ids}`` passed as
``model(tokens=ids)``), the ``MultiheadAttention`` module with its packed
q/k/v projection, and the encoder layer's functional ReLU (``F.relu``,
recorded as ``encoder.layers.0.relu()``). Dropout is 0 so train and eval mode
agree.
"""

from __future__ import annotations

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431


class TinyTransformer(nn.Module):
    """Token ids ``(batch, seq_len)`` -> per-token logits ``(batch, seq_len, vocab_size)``."""

    def __init__(
        self,
        vocab_size: int = 100,
        d_model: int = 64,
        nhead: int = 4,
        dim_feedforward: int = 128,
        num_layers: int = 2,
        max_len: int = 16,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)  # learned, one row per position
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        # The nested-tensor fast path is unavailable with norm_first anyway;
        # turning it off here only silences torch's warning about that.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        # Pre-LN blocks leave the residual stream unnormalized: the last
        # LayerNorm is what brings it back to unit scale before the head.
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len = tokens.shape[1]
        if seq_len > self.pos_emb.num_embeddings:
            raise ValueError(
                f"sequence of length {seq_len} is longer than max_len={self.pos_emb.num_embeddings}"
            )
        positions = torch.arange(seq_len, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (batch, seq, d) + (seq, d)
        x = self.encoder(x)
        return self.head(self.norm(x))


def build(
    vocab_size: int = 100,
    d_model: int = 64,
    nhead: int = 4,
    dim_feedforward: int = 128,
    num_layers: int = 2,
    seq_len: int = 16,
    batch_size: int = 4,
) -> tuple[TinyTransformer, dict[str, torch.Tensor]]:
    """Return the model and ``{"tokens": ids}``, ids uniform in ``[0, vocab_size)``.

    The inputs are a dict, so a caller runs ``model(**inputs)``. Weights come
    from the global RNG; the batch from a private generator.
    """
    model = TinyTransformer(vocab_size, d_model, nhead, dim_feedforward, num_layers, seq_len)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    return model, {"tokens": tokens}


if __name__ == "__main__":
    net, inputs = build()
    print(net(**inputs).shape)  # torch.Size([4, 16, 100])
