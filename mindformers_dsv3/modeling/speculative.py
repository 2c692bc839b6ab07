"""The compiled pieces of speculative decoding with the MTP layer (the loop: mindformers_dsv3/speculative.py).

Three cells share the parameters and the latent caches of a `DeepseekV3ForCausalLM` (`net`):

* `SpecPrefill`: the model's own prefill (the same ops, so the same first token), returning also the
  final-norm hidden state of every prompt position (the MTP layer drafts from them);
* `SpecVerify`: a multi-token decode step of the main model: S new positions per sequence (the pending
  token and the drafts) written at their slots and attending causally to the cache and to each other;
* `MTPStep`: one MTP module over S positions per sequence (its own latent cache, written then read),
  returning the logits and the hidden state of each sequence's last real position.

Positions past a sequence's last real one (a fixed graph width, a sequence near its limit) repeat the
last real position: the same token, position and slot, and the cache write takes the last real row
(`write_rows`), so duplicate writes carry identical data. The cells are kept off the model's cell tree
(they hold the model; the model does not hold them).
"""
import mindspore as ms
from mindspore import nn, ops

__all__ = ["MTPStep", "SpecPrefill", "SpecVerify", "cache_mask"]

MASK_VALUE = -1.0e9


def cache_mask(net, block_tables, positions):
    """read slots (B, T) of the sequences' blocks and the causal mask (B, 1, S, T): query at position p sees
    the cache positions <= p."""
    batch, seq = positions.shape
    blocks = ops.maximum(block_tables, 0).reshape(batch, -1, 1) * net.block_size
    read_slots = (blocks + ops.arange(net.block_size, dtype=ms.int32).reshape(1, 1, -1)).reshape(batch, -1)
    cols = ops.arange(read_slots.shape[1], dtype=ms.int32).reshape(1, 1, -1)
    seen = cols <= positions.reshape(batch, seq, 1)
    mask = ops.where(seen, 0.0, MASK_VALUE).astype(ms.float32).reshape(batch, 1, seq, -1)
    return read_slots, mask


def rope_at(net, positions):
    batch, seq = positions.shape
    flat = positions.reshape(-1)
    cos = ops.gather(net.rope_cos, flat, 0).reshape(batch, seq, -1)
    sin = ops.gather(net.rope_sin, flat, 0).reshape(batch, seq, -1)
    return cos, sin


class _SpecCell(nn.Cell):
    """Holds the model outside its cell tree (no cycle, no second parameter prefix)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "_net_ref", net)
        self.set_train(False)

    @property
    def net(self):
        return self._net_ref

    @property
    def compile_phase(self):
        return nn.Cell.compile_phase.fget(self)

    @compile_phase.setter
    def compile_phase(self, value):   # see HostGenerationMixin.compile_phase
        if value != nn.Cell.compile_phase.fget(self):
            nn.Cell.compile_phase.fset(self, value)


class SpecPrefill(_SpecCell):
    """(input_ids (B, seq), valid_length (B,), slot_mapping (B*seq,)) -> (logits (B, V) of each sequence's last
    valid position, computed exactly as the model's prefill; final-norm hidden states (B, seq, H))."""

    def construct(self, input_ids, valid_length, slot_mapping):
        net = self.net
        batch, seq = input_ids.shape
        hidden = net.model.embed_tokens(input_ids)
        cos, sin, mask = net._full_inputs(seq)
        write_rows, write_slots = net._prefill_writes(batch, seq, valid_length, slot_mapping)
        for layer in net.model.layers:
            hidden, _ = layer(hidden, cos, sin, mask, write_rows, write_slots, None)
        last_rows = ops.arange(batch, dtype=ms.int32) * seq + ops.maximum(valid_length - 1, 0)
        last = ops.gather(hidden.reshape(batch * seq, -1), last_rows, 0).reshape(batch, 1, -1)
        logits = net.head(net.model.norm(last)).astype(ms.float32).reshape(batch, net.vocab_size)
        return logits, net.model.norm(hidden)


class SpecVerify(_SpecCell):
    """(input_ids (B, S), positions (B, S), write_rows (B*S,), slots (B*S,), block_tables) -> (logits (B*S, V),
    final-norm hidden states (B, S, H)). Row b*S + j is written at slots[b*S + j] from row write_rows[...]."""

    def construct(self, input_ids, positions, write_rows, slots, block_tables):
        net = self.net
        batch, seq = input_ids.shape
        hidden = net.model.embed_tokens(input_ids)
        cos, sin = rope_at(net, positions)
        read_slots, mask = cache_mask(net, block_tables, positions)
        for layer in net.model.layers:
            hidden, _ = layer(hidden, cos, sin, mask, write_rows, slots, read_slots)
        normed = net.model.norm(hidden)
        logits = net.head(normed)
        return logits.astype(ms.float32).reshape(batch * seq, net.vocab_size), normed


class MTPStep(_SpecCell):
    """MTP module `depth` over S positions: (hidden (B, S, H) of the previous depth (the main model's final-norm
    states for depth 0), input_ids (B, S) of the next tokens, positions, write_rows, slots, block_tables,
    last_rows (B,) = b*S + index of the last real position) -> (logits (B, V), hidden (B, 1, H)) there."""

    def __init__(self, net, depth):
        super().__init__(net)
        self.depth = depth

    def construct(self, hidden, input_ids, positions, write_rows, slots, block_tables, last_rows):
        net = self.net
        mtp = net.model.mtp[self.depth]
        batch, seq = input_ids.shape
        cos, sin = rope_at(net, positions)
        read_slots, mask = cache_mask(net, block_tables, positions)
        embeds = net.model.embed_tokens(input_ids)
        out, _ = mtp.step(hidden, embeds, cos, sin, mask, write_rows, slots, read_slots)
        last = ops.gather(out.reshape(batch * seq, -1), last_rows, 0).reshape(batch, 1, -1)
        logits = net.head(mtp.norm(last)).astype(ms.float32).reshape(batch, net.vocab_size)
        return logits, last
