"""DeepSeekMoE: shared experts plus routed experts with aux-loss-free group-limited routing.

Split inference (`par`; mindformers_dsv3.parallel.comm): the dp x mp ranks of the model together
hold every routed expert once. Rank r holds the contiguous block of n_routed_experts / ep experts of
its ep_rank, each expert's intermediate dim split etp = dp x mp / ep ways; the shared experts are
split over mp like the dense MLP; the router is replicated. With dp > 1 (data-parallel attention)
the tokens of the dp ranks are all-gathered first. Every rank routes every token (same weights,
same result), runs its local experts on the (token, expert) pairs that chose them, adds its shared
expert partial at its own tokens' rows, and one all-reduce over all ranks sums the partial outputs;
each rank keeps its own tokens' rows.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_dsv3.kernels import GroupedMatmul, GroupedQuantMatmul, route_kernel, silu
from mindformers_dsv3.modeling.layers import GatedMLP
from mindformers_dsv3.parallel.comm import GroupAllGather, GroupAllReduce
from mindformers_dsv3.quant.config import FLOAT
from mindformers_dsv3.quant.layers import int8_param, scale_param, weight_scale_for

NEG_INF = float("-inf")


def _data_parallel():
    mode = ms.get_auto_parallel_context("parallel_mode")
    return mode in ("data_parallel", "hybrid_parallel")


class Router(nn.Cell):
    """Scores every expert, picks top-k inside the best groups (DeepSeek-V3 semantics).

    * scores = sigmoid(x @ W^T) in float32 (softmax for `scoring_func: softmax`);
    * selection uses scores + e_score_correction_bias (the bias never weights outputs);
    * noaux_tc: a group scores the sum of its top-2 biased scores; the best `topk_group`
      groups are kept and every expert of the other groups is masked with -inf;
    * weights are the unbiased scores of the chosen experts, normalised when
      `norm_topk_prob`, times `routed_scaling_factor`.
    """

    PARALLEL_ROLE = "router"  # what parallel/sharding.py shards it as

    def __init__(self, config, param_dtype=ms.float32):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.method = config.topk_method
        self.sigmoid_scores = config.scoring_func == "sigmoid"
        self.normalize = bool(config.norm_topk_prob)
        self.scaling = float(config.routed_scaling_factor)
        self.weight = Parameter(initializer(Normal(sigma=config.initializer_range),
                                            (self.num_experts, config.hidden_size), param_dtype))
        self.e_score_correction_bias = Parameter(Tensor(np.zeros(self.num_experts), ms.float32),
                                                 requires_grad=False)
        # tokens routed to each expert in the last training step (aux-loss-free balancing)
        self.expert_load = Parameter(Tensor(np.zeros(self.num_experts), ms.float32), requires_grad=False)
        self.update_rate = float(config.bias_update_rate)
        self.matmul = ops.MatMul(transpose_b=True)
        self.allreduce = None
        if _data_parallel():
            self.allreduce = ops.AllReduce()
        # inference on a CPU: the selection below as one kernel (kernels.route_kernel)
        fused = route_kernel(self.top_k, self.n_group, self.topk_group, self.method, self.sigmoid_scores,
                             self.normalize, self.scaling)
        self.fused_op, self.fused_cfg = fused if fused is not None else (None, None)

    def record_load(self, load):
        return ops.assign(self.expert_load, ops.stop_gradient(load))

    def update_bias(self):
        """bias += rate * sign(mean_load - load): overloaded experts get picked less next step."""
        load = self.expert_load
        if self.allreduce is not None:
            load = self.allreduce(load)
        delta = self.update_rate * ops.sign(load.mean() - load)
        return ops.assign(self.e_score_correction_bias, self.e_score_correction_bias + delta)

    def _group_mask(self, choice):
        n = choice.shape[0]
        grouped = choice.reshape(n, self.n_group, self.num_experts // self.n_group)
        if self.method == "noaux_tc":
            group_scores = ops.topk(grouped, 2)[0].sum(-1)
        else:  # group_limited_greedy
            group_scores = grouped.max(-1)
        _, groups = ops.topk(group_scores, self.topk_group)
        kept = ops.one_hot(groups, self.n_group, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)).sum(1)
        kept = ops.broadcast_to(kept.reshape(n, self.n_group, 1), grouped.shape).reshape(n, self.num_experts)
        return kept > 0.5

    def construct(self, x):
        """x (N,H) -> expert ids (N,k) int32, weights (N,k) float32, scores (N,E) float32."""
        logits = self.matmul(x.astype(ms.float32), self.weight.astype(ms.float32))
        scores = ops.sigmoid(logits) if self.sigmoid_scores else ops.softmax(logits, -1)
        if self.fused_op is not None and not self.training:
            ids, weights = self.fused_op(logits, self.e_score_correction_bias, self.fused_cfg)
            return ids, weights, scores
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.reshape(1, -1)
        if self.method != "greedy" and self.n_group > 1:
            choice = ops.where(self._group_mask(choice), choice, ops.full_like(choice, NEG_INF))
        _, ids = ops.topk(choice, self.top_k)
        weights = ops.gather_elements(scores, 1, ids)
        if self.normalize and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return ids.astype(ms.int32), weights * self.scaling, scores


class RoutedExperts(nn.Cell):
    """Experts stacked as (E, H, 2I) gate|up and (E, I, H) down; tokens sorted by expert.

    Work and memory follow the T * top_k (token, expert) pairs: pairs are sorted by
    expert id, each expert multiplies only its rows (grouped matmul), and results are
    un-sorted and combined with the routing weights.

    Split (`par`): this rank holds experts [first, first + E / ep), each its I / etp slice
    ([gate slice | up slice] columns of gate_up, rows of down). Pairs routed elsewhere sort into an
    extra last group that no expert multiplies, and their outputs are zeroed: the result is this
    rank's partial sum of the routed output.
    """

    PARALLEL_ROLE = "routed_experts"  # what parallel/sharding.py shards it as

    def __init__(self, config, param_dtype=ms.float32, compute_dtype=ms.float32, par=None):
        super().__init__()
        e, h, i = self._local_sizes(config, par)
        std = config.initializer_range
        self.gate_up_proj = Parameter(initializer(Normal(sigma=std), (e, h, 2 * i), param_dtype))
        self.down_proj = Parameter(initializer(Normal(sigma=std), (e, i, h), param_dtype))
        self.gmm = GroupedMatmul()
        self.compute_dtype = compute_dtype

    def _local_sizes(self, config, par):
        """(experts, hidden, intermediate) this rank holds; sets split, first, num_experts, inter, top_k."""
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.split = par is not None
        self.first = 0
        if self.split:
            self.first, e = par.expert_block(e)
            i //= par.etp
        self.num_experts, self.inter, self.top_k = e, i, config.num_experts_per_tok
        return e, h, i

    def _group_rows(self, flat, groups):
        """(order, inverse, counts) of the pairs' group ids: `order` sorts the pairs by group, `inverse`
        puts them back, `counts` (num_experts,) is the pairs of each expert held here."""
        _, order = ops.sort(flat.astype(ms.float32))
        order = order.astype(ms.int32)
        _, inverse = ops.sort(order.astype(ms.float32))
        counts = ops.one_hot(flat, groups, Tensor(1, ms.int32), Tensor(0, ms.int32)).sum(0)
        if groups > self.num_experts:
            counts = counts[:self.num_experts]
        return order, inverse.astype(ms.int32), counts

    def _weight(self, param):
        """The expert weights in the compute dtype; no cast op (a copy of every expert) when equal."""
        return param if param.dtype == self.compute_dtype else param.astype(self.compute_dtype)

    def pair_outputs(self, x, flat, groups):
        """Output of every (token, expert) pair (N, top_k, H); `flat` (N * top_k,) holds group ids in
        [0, groups); groups >= num_experts are not multiplied (their rows are left as gmm leaves them)."""
        n, hidden = x.shape
        if flat.shape[0] <= self.num_experts:
            return self.few_pair_outputs(x, flat)
        order, inverse, counts = self._group_rows(flat, groups)
        rows = ops.gather(x, order // self.top_k, 0).astype(self.compute_dtype)
        gate_up = self.gmm(rows, self._weight(self.gate_up_proj), counts)
        gate, up = ops.split(gate_up, self.inter, 1)      # its gradient is one concat, not 2 slice grads + add
        act = silu(gate) * up
        out = self.gmm(act, self._weight(self.down_proj), counts)
        return ops.gather(out, inverse, 0).reshape(n, self.top_k, hidden)

    def few_pair_outputs(self, x, flat):
        """Fewer pairs than experts (decode): each pair multiplies its own expert's gathered weights,
        so neither the work nor the weight bytes touched depend on the number of experts. Group ids
        past the last expert (split: held elsewhere) are clamped; the caller zeroes those rows."""
        n, hidden = x.shape
        ids = ops.minimum(flat, self.num_experts - 1) if self.split else flat
        rows = ops.broadcast_to(x.astype(self.compute_dtype).reshape(n, 1, hidden), (n, self.top_k, hidden))
        rows = rows.reshape(n * self.top_k, 1, hidden)
        gate_up = ops.bmm(rows, ops.gather(self.gate_up_proj, ids, 0).astype(self.compute_dtype))
        gate, up = ops.split(gate_up, self.inter, -1)
        act = silu(gate) * up
        out = ops.bmm(act, ops.gather(self.down_proj, ids, 0).astype(self.compute_dtype))
        return out.reshape(n, self.top_k, hidden)

    def local_pair_outputs(self, x, ids):
        """Split: pairs routed to experts held elsewhere go to an extra last group and come out 0."""
        n, hidden = x.shape
        local = ids.reshape(-1) - self.first
        held = ops.logical_and(local >= 0, local < self.num_experts)
        flat = ops.where(held, local, ops.full_like(local, self.num_experts))
        out = self.pair_outputs(x, flat, self.num_experts + 1)
        return ops.where(held.reshape(n, self.top_k, 1), out, ops.zeros_like(out))

    def construct(self, x, ids, weights):
        n, _ = x.shape
        if self.split:
            out = self.local_pair_outputs(x, ids)
        else:
            out = self.pair_outputs(x, ids.reshape(-1), self.num_experts)
        # weighted sum over the top-k pairs as one (1, k) x (k, H) matmul per token: on a CPU a
        # multiply + ReduceSum over the middle axis costs 4-5x more, forward and backward
        weights = weights.astype(self.compute_dtype).reshape(n, 1, self.top_k)
        return ops.bmm(weights, out).reshape(n, out.shape[-1])


class QuantRoutedExperts(RoutedExperts):
    """W8A8_DYNAMIC routed experts: int8 gate_up_proj (E, H, 2I) and down_proj (E, I, H) (the float
    orientation), per-channel scales gate_up_scale (E, 2I) and down_scale (E, H), float32. Every
    (token, expert) pair runs through the grouped kernel (kernels.GroupedQuantMatmul): a per-token
    dynamic quantization before gate|up, SwiGLU, a fresh one before down. Split as the float experts."""

    def __init__(self, config, param_dtype=ms.float32, compute_dtype=ms.float32, par=None):
        nn.Cell.__init__(self)
        e, h, i = self._local_sizes(config, par)
        scale = weight_scale_for(config.initializer_range)
        self.gate_up_proj = int8_param((e, h, 2 * i))
        self.gate_up_scale = scale_param((e, 2 * i), scale)
        self.down_proj = int8_param((e, i, h))
        self.down_scale = scale_param((e, h), scale)
        self.qgmm = GroupedQuantMatmul()
        self.by_ids = not self.qgmm.ascend
        self.compute_dtype = compute_dtype

    def pair_outputs(self, x, flat, groups):
        """As RoutedExperts.pair_outputs, through the int8 grouped kernel; with fewer pairs than experts
        (decode) on a CPU each pair multiplies its own expert, unsorted (ids past the experts held
        here come out 0)."""
        n, hidden = x.shape
        if self.by_ids and flat.shape[0] <= self.num_experts:
            gate_up = self.qgmm.pairs(x, self.gate_up_proj, self.gate_up_scale, flat)
            gate, up = ops.split(gate_up, self.inter, 1)
            out = self.qgmm.pairs(silu(gate) * up, self.down_proj, self.down_scale, flat)
            return out.astype(self.compute_dtype).reshape(n, self.top_k, hidden)
        order, inverse, counts = self._group_rows(flat, groups)
        rows = ops.gather(x, order // self.top_k, 0).astype(ms.float32)
        gate_up = self.qgmm(rows, self.gate_up_proj, self.gate_up_scale, counts)
        gate, up = ops.split(gate_up, self.inter, 1)
        out = self.qgmm(silu(gate) * up, self.down_proj, self.down_scale, counts)
        out = ops.gather(out, inverse, 0).astype(self.compute_dtype)
        return out.reshape(n, self.top_k, hidden)


class MoE(nn.Cell):
    """Shared experts + routed experts. Returns (output, sequence-wise balance loss).

    In training the router records each expert's load (for the bias update that the
    train-step wrapper applies after the optimizer) and, when `seq_balance_loss_alpha`
    > 0, the complementary sequence-wise balance loss of the DeepSeek-V3 report:
    alpha * sum_i f_i * P_i per sequence, f_i = E / (k T) * #tokens choosing i,
    P_i = mean over the sequence of the normalised affinity s_i / sum_j s_j.
    """

    def __init__(self, config, param_dtype=ms.float32, compute_dtype=ms.float32, par=None, schemes=None):
        super().__init__()
        q = schemes or {}   # W8A8 scheme per module (quant/config.py layer_schemes); FLOAT when absent
        self.balance_alpha = float(config.seq_balance_loss_alpha)
        self.router = Router(config, param_dtype)
        experts = RoutedExperts if q.get("mlp.experts", FLOAT) == FLOAT else QuantRoutedExperts
        self.experts = experts(config, param_dtype, compute_dtype, par)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = GatedMLP(config.hidden_size,
                                           config.moe_intermediate_size * config.n_shared_experts,
                                           std=config.initializer_range, param_dtype=param_dtype,
                                           compute_dtype=compute_dtype, ways=par.mp if par is not None else 1,
                                           schemes=(q.get("mlp.shared_experts.gate_up_proj", FLOAT),
                                                    q.get("mlp.shared_experts.down_proj", FLOAT)))
        self.split = par is not None
        self.dp, self.dp_rank = 1, 0
        self.gather_tokens = self.combine = self.own_rows = None
        if self.split:
            self.dp, self.dp_rank = par.dp, par.dp_rank
            self.gather_tokens = GroupAllGather(par.dp_group)
            self.combine = GroupAllReduce(par.world_group)
            own = np.zeros((par.dp, 1, 1), np.float32)
            own[par.dp_rank] = 1.0
            self.own_rows = Tensor(own)

    def balance(self, ids, scores, batch, seq):
        """Record the expert load; return the sequence-wise balance loss."""
        num_experts, top_k = self.router.num_experts, self.router.top_k
        chosen = ops.one_hot(ids, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)).sum(1)
        load = ops.depend(chosen.sum(0), self.router.record_load(chosen.sum(0)))
        if self.balance_alpha <= 0:
            return ops.depend(Tensor(0.0, ms.float32), load)
        freq = chosen.reshape(batch, seq, num_experts).sum(1) * (num_experts / (top_k * seq))
        affinity = scores / scores.sum(-1, keepdims=True)
        prob = affinity.reshape(batch, seq, num_experts).mean(1)
        loss = self.balance_alpha * (ops.stop_gradient(freq) * prob).sum(-1).mean()
        return ops.depend(loss, load)

    def split_forward(self, flat):
        """This rank's tokens (N, H) -> their MoE output, computed with the other ranks."""
        n, hidden = flat.shape
        tokens = self.gather_tokens(flat) if self.dp > 1 else flat          # (dp * N, H), dp rank order
        ids, weights, _ = self.router(tokens)
        out = self.experts(tokens, ids, weights)                            # partial: local experts
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)                              # partial: local columns
            if self.dp > 1:                                                 # at this rank's own rows
                shared = (self.own_rows * shared.reshape(1, n, hidden)).reshape(self.dp * n, hidden)
            out = out + shared
        out = self.combine(out)
        if self.dp > 1:
            out = out[self.dp_rank * n:(self.dp_rank + 1) * n]
        return out

    def construct(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.split:
            return self.split_forward(flat).reshape(shape), Tensor(0.0, ms.float32)
        ids, weights, scores = self.router(flat)
        out = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux = Tensor(0.0, ms.float32)
        if self.training:
            aux = self.balance(ids, scores, shape[0], shape[1])
        return out.reshape(shape), aux
