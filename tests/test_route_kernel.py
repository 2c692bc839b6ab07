"""The fused CPU routing kernel (kernels.route_kernel, used by Router at inference) against the
Router's graph ops (its training path and the reference), for every routing method and scoring
function, with biases that move the choice across groups. (Exactly equal scores are not compared: the
order of exact ties is unspecified in MindSpore's TopK as in torch's.)"""
import types

import numpy as np
import pytest
from mindspore import Tensor

from mindformers_dsv3.kernels import cpu_kernel_library
from mindformers_dsv3.modeling.moe import Router

CASES = [  # (topk_method, scoring_func, n_group, topk_group, top_k, norm_topk_prob)
    ("noaux_tc", "sigmoid", 4, 2, 4, True),
    ("noaux_tc", "sigmoid", 8, 3, 8, True),
    ("group_limited_greedy", "softmax", 4, 1, 2, False),
    ("greedy", "softmax", 1, 1, 6, True),
    ("noaux_tc", "sigmoid", 1, 1, 1, True),
]


def _router(method, scoring, n_group, topk_group, top_k, normalize, experts=32, hidden=16):
    cfg = types.SimpleNamespace(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
                                topk_group=topk_group, topk_method=method, scoring_func=scoring,
                                norm_topk_prob=normalize, routed_scaling_factor=2.5, hidden_size=hidden,
                                initializer_range=0.5, bias_update_rate=0.0)
    return Router(cfg)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_fused_routing_equals_graph_ops(case):
    if cpu_kernel_library() is None:
        pytest.skip("no C++ compiler or oneDNN here: the graph ops are used")
    router = _router(*case)
    assert router.fused_op is not None
    rng = np.random.default_rng(len(case[0]) + case[2])
    bias = rng.standard_normal(router.num_experts).astype(np.float32)
    bias[: router.num_experts // 2] -= 2.0          # push choices away from the first groups
    router.e_score_correction_bias.set_data(Tensor(bias))
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x[1] = x[0]                                      # identical tokens route identically
    router.set_train(True)                           # graph ops (the training path)
    ids_ref, w_ref, scores_ref = (t.asnumpy() for t in router(Tensor(x)))
    router.set_train(False)                          # the fused kernel
    ids, w, scores = (t.asnumpy() for t in router(Tensor(x)))
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, scores_ref, rtol=0, atol=0)
    assert len(set(ids[0])) == case[4]               # k distinct experts
