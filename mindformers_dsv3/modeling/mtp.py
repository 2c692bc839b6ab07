"""Multi-token prediction (MTP) module, as in the DeepSeek-V3 report.

For depth j: h' = Block(eh_proj([enorm(emb(t+j)); hnorm(h)])), logits = lm_head(norm(h')).
The embedding and the output head are shared with the main model (the
checkpoint's copies under layer 61 duplicate them).

With speculative decoding (`num_speculative_tokens` > 0 and `use_past`) the block keeps its own paged
latent cache, as large as the main model's (`num_blocks * block_size` slots per layer): it drafts the
next tokens position by position (mindformers_dsv3/modeling/speculative.py, `step`).
"""
from mindspore import nn, ops

from mindformers_dsv3.modeling.decoder import DecoderLayer
from mindformers_dsv3.modeling.layers import Linear, RMSNorm


def mtp_cache_slots(config):
    """Latent cache slots of one MTP block: the main model's count when it drafts (speculative decoding)."""
    speculative = int(getattr(config, "num_speculative_tokens", 0) or 0)
    return config.num_blocks * config.block_size if config.use_past and speculative else 0


class MTPLayer(nn.Cell):
    def __init__(self, config, layer_idx, param_dtype, compute_dtype, par=None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps, param_dtype)
        self.hnorm = RMSNorm(hidden, eps, param_dtype)
        self.eh_proj = Linear(2 * hidden, hidden, std=config.initializer_range,
                              param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.layer = DecoderLayer(config, layer_idx, mtp_cache_slots(config), param_dtype, compute_dtype, par)
        self.norm = RMSNorm(hidden, eps, param_dtype)

    def construct(self, hidden, next_embeds, cos, sin, mask):
        """hidden: states of the previous depth at t (the main model's after its final norm);
        next_embeds: embeddings of token t+1. Returns (h, norm(h), balance loss)."""
        h = self.eh_proj(ops.concat((self.enorm(next_embeds), self.hnorm(hidden)), -1))
        h, aux = self.layer(h, cos, sin, mask)
        return h, self.norm(h), aux

    def step(self, hidden, next_embeds, cos, sin, mask, write_rows, write_slots, read_slots):
        """A drafting step through this block's latent cache (written at `write_slots`, then read at
        `read_slots`): returns (h, balance loss)."""
        h = self.eh_proj(ops.concat((self.enorm(next_embeds), self.hnorm(hidden)), -1))
        return self.layer(h, cos, sin, mask, write_rows, write_slots, read_slots)
