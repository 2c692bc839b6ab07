"""Multi-head latent attention (MLA) with the absorbed latent KV cache.

Per token and layer the cache holds only norm(c_kv) (kv_lora_rank values) and the
rotated shared k_pe (qk_rope_head_dim values). Two mathematically equal paths:

* naive: expand the latent through kv_b_proj into per-head K and V (prefill,
  training, full forward);
* absorbed: fold kv_b_proj's K half into the query and its V half into the
  output, attending directly over the latent cache (decode).
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from mindformers_dsv3.modeling.layers import Linear, RMSNorm, linear
from mindformers_dsv3.modeling.rope import apply_rope, rotate_half_matrix
from mindformers_dsv3.parallel.comm import GroupAllReduce


class MLAttention(nn.Cell):
    """MLA for one layer; owns its slice of the paged latent cache when `num_cache_slots` > 0."""

    def __init__(self, config, num_cache_slots=0, param_dtype=ms.float32, compute_dtype=ms.float32, par=None,
                 schemes=None):
        super().__init__()
        hidden = config.hidden_size
        ways = par.mp if par is not None else 1
        self.num_heads = config.num_attention_heads // ways   # heads held by this rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.q_rank = config.q_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = config.softmax_scale
        self.compute_dtype = compute_dtype
        std = config.initializer_range
        kw = dict(std=std, param_dtype=param_dtype, compute_dtype=compute_dtype)
        bias = bool(config.attention_bias)
        q = schemes or {}   # W8A8 scheme per module (quant/config.py layer_schemes); FLOAT when absent
        s = lambda name: q.get("self_attn." + name, "FLOAT")  # noqa: E731
        if self.q_rank:
            self.q_a_proj = linear(hidden, self.q_rank, s("q_a_proj"), bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(self.q_rank, config.rms_norm_eps, param_dtype,
                                         bias=q.get("self_attn.q_a_layernorm", False))
            self.q_b_proj = linear(self.q_rank, self.num_heads * self.qk_dim, s("q_b_proj"), **kw)
        else:
            self.q_proj = linear(hidden, self.num_heads * self.qk_dim, s("q_proj"), **kw)
        self.kv_a_proj_with_mqa = linear(hidden, self.kv_rank + self.rope_dim, s("kv_a_proj_with_mqa"),
                                         bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps, param_dtype)
        self.kv_b_proj = Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), **kw)
        self.o_proj = linear(self.num_heads * self.v_dim, hidden, s("o_proj"), bias=bias, **kw)
        self.reduce = GroupAllReduce(par.tp_group) if ways > 1 else None
        self.rotation = Tensor(rotate_half_matrix(self.rope_dim))
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.latent_cache = None
        if num_cache_slots:
            self.latent_cache = Parameter(
                initializer("zeros", (num_cache_slots, self.kv_rank + self.rope_dim), compute_dtype),
                name="latent_cache", requires_grad=False)

    # ------------------------------------------------------------ projections
    def project(self, x, cos, sin):
        """x (B,S,H) -> q_nope (B,h,S,dn), q_pe (B,h,S,dr), latent (B,S,c), k_pe (B,S,dr)."""
        b, s, _ = x.shape
        if self.q_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.reshape(b, s, self.num_heads, self.qk_dim).transpose(0, 2, 1, 3)
        q_nope = q[..., :self.nope_dim]
        q_pe = apply_rope(q[..., self.nope_dim:], cos.reshape(-1, 1, s, self.rope_dim),
                          sin.reshape(-1, 1, s, self.rope_dim), self.rotation)
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., :self.kv_rank])
        k_pe = apply_rope(kv[..., self.kv_rank:], cos, sin, self.rotation)
        return q_nope, q_pe, latent, k_pe

    def _kv_b(self):
        w = self.kv_b_proj.weight.astype(self.compute_dtype)
        return w.reshape(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)

    def _merge_heads(self, out):
        b, _, s, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(b, s, self.num_heads * self.v_dim)

    def _softmax(self, scores, mask):
        scores = scores.astype(ms.float32) * self.scale + mask
        return ops.softmax(scores, -1).astype(self.compute_dtype)

    # ------------------------------------------------------------ attention
    def attend_naive(self, q_nope, q_pe, latent, k_pe, mask):
        """Expand latent into per-head K/V. latent (B,T,c), k_pe (B,T,dr), mask (B|1,1,S,T)."""
        b, t, _ = latent.shape
        kv = self.kv_b_proj(latent).reshape(b, t, self.num_heads, self.nope_dim + self.v_dim)
        kv = kv.transpose(0, 2, 1, 3)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        k_pe = ops.broadcast_to(k_pe.reshape(b, 1, t, self.rope_dim), (b, self.num_heads, t, self.rope_dim))
        q = ops.concat((q_nope, q_pe), -1)
        k = ops.concat((k_nope, k_pe), -1)
        probs = self._softmax(ops.matmul(q, k.swapaxes(-1, -2)), mask)
        return self._merge_heads(ops.matmul(probs, v))

    def attend_absorbed(self, q_nope, q_pe, rows, mask):
        """Attend over latent cache rows directly: rows (B,T,c+dr) = [norm(c_kv) | k_pe], mask (B,1,S,T).

        q_nope @ W_UK gives the query in latent space; [q_lat | q_pe] . rows is the score (the nope
        and rope dot products in one matmul); the probabilities weight the rows, and the latent part
        of the result goes through W_UV. kv_b_proj's weight (h, nope + v, c) is used whole: the query
        is zero-padded over the V rows and the output's nope columns are dropped, so no weight-sized
        slice or transpose runs per step.
        """
        b, h, s, _ = q_nope.shape
        t = rows.shape[1]
        w = self._kv_b()                                                    # (h, nope + v, c)
        q = ops.concat((q_nope, ops.zeros((b, h, s, self.v_dim), q_nope.dtype)), -1)
        q = q.transpose(1, 0, 2, 3).reshape(h, b * s, self.nope_dim + self.v_dim)
        q_lat = self.bmm(q, w).reshape(h, b, s, self.kv_rank).transpose(1, 0, 2, 3)   # (B,h,S,c)
        q_all = ops.concat((q_lat, q_pe), -1).reshape(b, h * s, self.kv_rank + self.rope_dim)
        scores = self.bmm_t(q_all, rows).reshape(b, h, s, t)
        probs = self._softmax(scores, mask).reshape(b, h * s, t)
        out_lat = self.bmm(probs, rows)[..., :self.kv_rank]                 # (B, h*S, c)
        out_lat = out_lat.reshape(b, h, s, self.kv_rank).transpose(1, 0, 2, 3).reshape(h, b * s, self.kv_rank)
        out = self.bmm_t(out_lat, w)[..., self.nope_dim:]                   # (h, B*S, v)
        out = out.reshape(h, b, s, self.v_dim).transpose(1, 2, 0, 3)
        return out.reshape(b, s, h * self.v_dim)

    # ------------------------------------------------------------ cache
    def write_cache(self, latent, k_pe, write_rows, write_slots):
        """Cache rows [latent | k_pe] of the tokens `write_rows` (None: every token, in order) at `write_slots`."""
        entries = ops.concat((latent, k_pe), -1).reshape(-1, self.kv_rank + self.rope_dim)
        if write_rows is not None:
            entries = ops.gather(entries, write_rows, 0)
        entries = entries.astype(self.latent_cache.dtype)
        # in place: tensor_scatter_update + assign copies the whole cache on every call
        return ops.scatter_update(self.latent_cache, write_slots.reshape(-1), entries)

    def read_cache(self, read_slots):
        """Cache rows (B, T, c + dr) at read_slots (B, T)."""
        b, t = read_slots.shape
        rows = ops.gather(self.latent_cache, read_slots.reshape(-1), 0).astype(self.compute_dtype)
        return rows.reshape(b, t, self.kv_rank + self.rope_dim)

    def construct(self, x, cos, sin, mask, write_rows=None, write_slots=None, read_slots=None):
        q_nope, q_pe, latent, k_pe = self.project(x, cos, sin)
        if write_slots is not None:
            latent = ops.depend(latent, self.write_cache(latent, k_pe, write_rows, write_slots))
        if read_slots is None:
            out = self.attend_naive(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self.attend_absorbed(q_nope, q_pe, self.read_cache(read_slots), mask)
        out = self.o_proj(out)
        if self.reduce is not None:
            out = self.reduce(out)
        return out
