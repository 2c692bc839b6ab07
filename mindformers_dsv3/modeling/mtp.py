"""Multi-token prediction (MTP) module, as in the DeepSeek-V3 report.

For depth j: h' = Block(eh_proj([enorm(emb(t+j)); hnorm(h)])), logits = lm_head(norm(h')).
The embedding and the output head are shared with the main model (the
checkpoint's copies under layer 61 duplicate them).
"""
from mindspore import nn, ops

from mindformers_dsv3.modeling.decoder import DecoderLayer
from mindformers_dsv3.modeling.layers import Linear, RMSNorm


class MTPLayer(nn.Cell):
    def __init__(self, config, layer_idx, param_dtype, compute_dtype, par=None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps, param_dtype)
        self.hnorm = RMSNorm(hidden, eps, param_dtype)
        self.eh_proj = Linear(2 * hidden, hidden, std=config.initializer_range,
                              param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.layer = DecoderLayer(config, layer_idx, 0, param_dtype, compute_dtype, par)
        self.norm = RMSNorm(hidden, eps, param_dtype)

    def construct(self, hidden, next_embeds, cos, sin, mask):
        """hidden: states of the previous depth at t (the main model's after its final norm);
        next_embeds: embeddings of token t+1. Returns (h, norm(h), balance loss)."""
        h = self.eh_proj(ops.concat((self.enorm(next_embeds), self.hnorm(hidden)), -1))
        h, aux = self.layer(h, cos, sin, mask)
        return h, self.norm(h), aux
