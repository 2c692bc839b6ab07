"""DeepseekV3TrainOneStepCell: the global norm it reports and clips with is the norm of the
gradients (against the gradients computed separately), and a step whose gradients are not finite is
reported as overflow and changes no weight."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindformers_dsv3.training import DeepseekV3TrainOneStepCell
from tests import hf_fixtures as hf
from tests.model_fixtures import build_ms_model

SEQ = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = hf.tiny_hf_config()
    path = tmp_path_factory.mktemp("tiny_train_step")
    hf.save_hf_folder(path, config, hf.random_hf_state_dict(config, seed=5))
    return path


def _model(folder):
    model = build_ms_model(folder, use_past=False, seq_length=SEQ, batch_size=2)
    model.set_train(True)
    return model


def _tokens(seed=0):
    return Tensor(np.random.RandomState(seed).randint(2, 100, size=(2, SEQ + 1)).astype(np.int32))


def test_global_norm_is_the_norm_of_the_gradients(folder):
    model = _model(folder)
    weights = model.trainable_params()
    grads = ops.value_and_grad(model, None, weights)(_tokens())[1]
    expected = np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    before = {p.name: p.asnumpy().copy() for p in weights}
    step = DeepseekV3TrainOneStepCell(model, nn.SGD(weights, learning_rate=0.1), use_clip_grad=True,
                                      max_grad_norm=expected / 4)
    step.set_train(True)
    _, overflow, _, _, norm = step(_tokens())
    assert not bool(overflow.asnumpy())
    np.testing.assert_allclose(float(norm.asnumpy()), expected, rtol=1e-5)
    # SGD with clipping to a quarter of the norm: every weight moved by lr * g / 4
    for p, g in zip(weights, grads):
        np.testing.assert_allclose(before[p.name] - p.asnumpy(), 0.1 * g.asnumpy() / 4, rtol=2e-3, atol=1e-6)


def test_non_finite_gradients_skip_the_step(folder):
    model = _model(folder)
    weights = model.trainable_params()
    norm_weight = next(p for p in weights if p.name.endswith("model.norm.weight"))
    poisoned = norm_weight.asnumpy().copy()
    poisoned[0] = np.inf
    norm_weight.set_data(Tensor(poisoned))
    before = {p.name: p.asnumpy().copy() for p in weights}
    step = DeepseekV3TrainOneStepCell(model, nn.SGD(weights, learning_rate=0.1))
    step.set_train(True)
    _, overflow, _, _, norm = step(_tokens(1))
    assert bool(overflow.asnumpy())
    assert not np.isfinite(float(norm.asnumpy()))
    for p in weights:
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])
