"""Training helpers registered with MindFormers: the train-step wrapper and the MoE monitor callback.

Stock `MFTrainOneStepCell` checks overflow with an Ascend-only status op. This
wrapper does one forward (value_and_grad), reduces gradients across data-parallel
ranks, checks finiteness (of the global norm) with portable ops, clips by global norm, applies the
optimizer and then the aux-loss-free expert-bias update. It returns the 5-tuple
stock loss monitors read: (loss, overflow, loss scale, learning rate, global norm).
"""
import copy
import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.train.callback import Callback
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


def _network_of(net):
    """The DeepSeek model inside possible wrappers (anything with update_expert_bias)."""
    while not hasattr(net, "update_expert_bias") and hasattr(net, "network"):
        net = net.network
    return net


def _sum_of_squares(grad):
    """sum(grad ** 2) in float32, reduced row by row first: a whole-tensor ReduceSum is several times
    slower on a CPU (and `all_finite` over every gradient costs as much again)."""
    squares = ops.square(grad.astype(ms.float32))
    return squares.reshape(-1, squares.shape[-1]).sum(-1).sum() if squares.ndim > 1 else squares.sum()


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class DeepseekV3TrainOneStepCell(nn.Cell):
    """One optimizer step for DeepSeek-V3 that runs on CPU and Ascend alike.

    Args:
        network: the model (its construct returns the training loss in train mode).
        optimizer: a MindSpore optimizer over the trainable parameters.
        use_clip_grad / max_grad_norm: global-norm gradient clipping.
        scale_sense: a static loss scale (float); dynamic loss scaling is not used in fp32.
    """

    def __init__(self, network, optimizer, use_clip_grad=True, max_grad_norm=1.0, scale_sense=1.0, **kwargs):
        super().__init__(auto_prefix=False)
        for key in ("parallel_config", "calculate_per_token_loss", "global_norm_spike_threshold",
                    "print_separate_loss", "use_skip_data_by_global_norm"):
            kwargs.pop(key, None)  # stock Trainer passes these to every wrapper
        if kwargs:
            raise TypeError(f"runner_wrapper: unknown key(s) {sorted(kwargs)} for DeepseekV3TrainOneStepCell")
        self.network = network
        self.model = _network_of(network)
        if hasattr(self.model, "apply_training_layout"):
            self.model.apply_training_layout()  # recompute / training sharding (once; the training path)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ops.value_and_grad(network, None, self.weights)
        self.use_clip_grad = bool(use_clip_grad)
        self.max_grad_norm = float(max_grad_norm)
        scale = getattr(scale_sense, "loss_scale_value", scale_sense)
        self.scale_sense = Tensor(float(scale.asnumpy() if isinstance(scale, Tensor) else scale), ms.float32)
        self.learning_rate = copy.deepcopy(optimizer.learning_rate)
        self.grad_reducer = nn.Identity()
        mode = ms.get_auto_parallel_context("parallel_mode")
        if mode in ("data_parallel", "hybrid_parallel"):
            self.grad_reducer = nn.DistributedGradReducer(self.weights, mean=True)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        grads = self.grad_reducer(grads)
        global_norm = ops.sqrt(ops.addn([_sum_of_squares(g) for g in grads]))
        # one check for every gradient: an inf or nan anywhere makes the norm non-finite (as does a
        # gradient whose squares overflow float32, which is no usable step either)
        finite = ops.isfinite(global_norm)
        if self.use_clip_grad:
            factor = self.max_grad_norm / ops.maximum(global_norm, self.max_grad_norm)
            grads = tuple([g * factor.astype(g.dtype) for g in grads])
        learning_rate = self.learning_rate
        if self.optimizer.dynamic_lr:
            learning_rate = self.learning_rate(self.optimizer.global_step).reshape(())
        if finite:
            loss = ops.depend(loss, self.optimizer(grads))
            loss = ops.depend(loss, self.model.update_expert_bias())
        return loss, ops.logical_not(finite), self.scale_sense, learning_rate, global_norm


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class MoEMonitor(Callback):
    """Records the total, LM, MTP and balance losses and the expert-load imbalance (max/mean).

    Every step goes into `history` (one dict per step: step, global_step, loss, lm_loss, mtp_loss,
    balance_loss, imbalance, imbalance_per_layer) and, when `history_file` is set, into that JSON-lines
    file, rewritten at the start of each run; every `per_print_times` steps a line is logged. YAML::

        callbacks:
          - type: MoEMonitor
            auto_register: deepseek3.MoEMonitor
            per_print_times: 10
            history_file: 'moe_history_rank_{rank}.jsonl'   # optional; under output_dir

    Args:
        per_print_times (int): log every this many steps.
        history_file (str, optional): JSON-lines file of the per-step records; a relative path is
            under MindFormers' output_dir, ``{rank}`` becomes the rank id.
    """

    def __init__(self, per_print_times=1, history_file=None, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"callbacks: unknown key(s) {sorted(kwargs)} for MoEMonitor")
        self.per_print_times = max(int(per_print_times), 1)
        self.history_file = history_file or None
        self.history = []
        self._path = None

    @staticmethod
    def _rank():
        try:
            from mindformers.tools.utils import get_real_rank
            return int(get_real_rank())
        except Exception:  # pylint: disable=broad-except
            return 0

    @staticmethod
    def _total_loss(params):
        outputs = params.net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        return float(loss.asnumpy()) if hasattr(loss, "asnumpy") else float(loss)

    @staticmethod
    def _global_step(params):
        """The optimizer's step counter (restored on resume; counts with a learning-rate schedule)."""
        step = getattr(getattr(params.train_network, "optimizer", None), "global_step", None)
        return None if step is None else int(np.asarray(step.asnumpy()).reshape(-1)[0])

    def history_path(self):
        """Where the records go this run (None without history_file)."""
        if not self.history_file:
            return None
        from mindformers.tools.utils import get_output_root_path
        path = os.path.join(get_output_root_path(), self.history_file.replace("{rank}", str(self._rank())))
        return os.path.abspath(path)

    def on_train_begin(self, run_context):
        self.history = []
        self._path = self.history_path()
        if self._path:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            open(self._path, "w", encoding="utf-8").close()

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        step = int(params.cur_step_num)
        model = _network_of(params.train_network)
        if not hasattr(model, "last_losses"):
            return
        lm, mtp, balance = (float(v) for v in model.last_losses.asnumpy())
        loads = model.expert_loads()
        ratios = [float(l.max() / max(l.mean(), 1e-9)) for l in loads.values()]
        record = {"step": step, "global_step": self._global_step(params), "loss": self._total_loss(params),
                  "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance,
                  "imbalance": float(np.mean(ratios)) if ratios else 0.0, "imbalance_per_layer": ratios}
        self.history.append(record)
        path = getattr(self, "_path", None)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if step % self.per_print_times == 0:
            logger.info("step %d: loss %.4f, lm_loss %.4f, mtp_loss %.4f, balance_loss %.6f, "
                        "expert load max/mean %.3f", step, record["loss"], lm, mtp, balance, record["imbalance"])
