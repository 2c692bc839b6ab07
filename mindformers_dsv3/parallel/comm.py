"""Frontend ("explicit") parallel inference: rank coordinates, process groups and collectives.

`ParallelContext.from_config(config)` decides, from the config alone, whether this process builds
one shard of a split model: the predict layout (``use_past: True``) of a ``parallel_config`` with
more than one rank, with communication initialised (``use_parallel: True`` makes MindFormers'
``build_context`` call ``init()``; msrun starts the processes). It returns None for a single-process
model (and for training builds, which MindSpore's own parallel modes split).

Rank coordinates follow ``layout.Layout.coords`` (the planner's numbering): ``r = dp_rank * mp +
tp_rank``; routed experts ``ep_rank = r // etp``, ``etp_rank = r % etp`` with ``etp = dp * mp / ep``.
Groups (``Group`` objects; ``world_size`` is always the int): ``tp_group`` (the mp ranks of one
data-parallel copy), ``dp_group`` (the dp ranks with the same tp_rank), ``world_group`` (every rank: the
routed experts of a stage). A group is created (``create_group``, accelerators only) when the first
collective over it is built, not when the context is made.

Collectives are `AllReduce` / `AllGather` only (the two that run on a CPU). MindSpore 2.7.1's CPU
backend accepts them on the world group alone (``create_group`` succeeds, but ``AllReduce only
support mccl_world_group on CPU``): on a CPU a sub-group collective is a world AllGather followed by
a selection of the group's rows (and a sum for AllReduce). Exact, world/group times the bytes; on
Ascend (or when the group is the world) the native group is used.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindformers_dsv3.config import ConfigError
from mindformers_dsv3.parallel.checks import check_config_layout
from mindformers_dsv3.parallel.layout import Layout, LayoutError

__all__ = ["ParallelContext", "Group", "GroupAllReduce", "GroupAllGather", "comm_initialized"]

_CREATED = set()


def comm_initialized():
    """True once ``mindspore.communication.init()`` ran in this process."""
    try:
        from mindspore.communication import GlobalComm
        return bool(GlobalComm.INITED)
    except Exception:  # pragma: no cover
        return False


def _native_subgroups():
    """Sub-group collectives run natively off the CPU backend (Ascend HCCL, GPU NCCL)."""
    try:
        return ms.get_context("device_target") != "CPU"
    except Exception:  # pragma: no cover
        return False


class Group:
    """An ordered set of global ranks that this rank belongs to; ``world_size``: ranks in the world."""

    def __init__(self, kind, ranks, rank, world_size):
        self.kind = kind
        self.ranks = tuple(int(r) for r in ranks)
        self.size = len(self.ranks)
        self.index = self.ranks.index(rank)
        self.is_world = self.size == world_size
        self.world_size = world_size
        self._name = None

    @property
    def name(self):
        """The communication group's name, created on first use (None: a group of one, or a sub-group on a
        CPU, where only the world group has collectives)."""
        if self._name is None and self.size > 1:
            from mindspore.communication import GlobalComm
            if self.is_world:
                self._name = GlobalComm.WORLD_COMM_GROUP
            elif _native_subgroups():  # pragma: no cover - needs an accelerator
                from mindspore.communication import create_group
                self._name = f"dsv3_{self.kind}_" + "-".join(map(str, self.ranks))
                if self._name not in _CREATED:
                    create_group(self._name, list(self.ranks))
                    _CREATED.add(self._name)
        return self._name

    @property
    def native(self):
        return self.name is not None

    def __repr__(self):
        return f"Group({self.kind}, ranks={self.ranks})"


class _GroupCollective(nn.Cell):
    """A collective over `group`: the native op where sub-groups exist, else (CPU, where only the
    world group has collectives) a world AllGather from which the group's rows are picked."""

    def __init__(self, group, native_op):
        super().__init__()
        self.size = group.size
        self.native = group.native
        if self.size > 1 and self.native:
            self.op = native_op(group=group.name)
        elif self.size > 1:
            self.op = ops.AllGather()
            self.world_size = group.world_size
            self.members = Tensor(np.array(group.ranks, np.int32))

    def group_rows(self, x):
        """(group size,) + x.shape: every member's x, in group order (non-native path)."""
        stacked = self.op(x).reshape((self.world_size,) + x.shape)
        return ops.gather(stacked, self.members, 0)


class GroupAllReduce(_GroupCollective):
    """Sum over the group (identity for a group of one)."""

    def __init__(self, group):
        super().__init__(group, ops.AllReduce)

    def construct(self, x):
        if self.size == 1:
            return x
        if self.native:
            return self.op(x)
        return self.group_rows(x).sum(0)


class GroupAllGather(_GroupCollective):
    """Concatenate the group's tensors along axis 0, in group order (identity for a group of one)."""

    def __init__(self, group):
        super().__init__(group, ops.AllGather)

    def construct(self, x):
        if self.size == 1:
            return x
        if self.native:
            return self.op(x)
        return self.group_rows(x).reshape((self.size * x.shape[0],) + x.shape[1:])


def _parallel_mode():
    try:
        return ms.get_auto_parallel_context("parallel_mode")
    except Exception:  # pragma: no cover
        return "stand_alone"


class ParallelContext:
    """This rank's place in a frontend-parallel predict layout, and its groups."""

    def __init__(self, layout, rank, world):
        """world: the number of processes (an int, as everywhere; the group of them is world_group)."""
        if layout.pp != 1:
            raise LayoutError([f"parallel_config.pipeline_stage={layout.pp}: split inference runs one stage "
                               "(data / model / expert parallel); set pipeline_stage: 1 for predict"])
        if layout.world != world:
            raise LayoutError([f"parallel_config.data_parallel * model_parallel = {layout.dp} * {layout.mp} = "
                               f"{layout.world} does not equal the {world} processes started (msrun --worker_num)"])
        self.layout, self.rank, self.world_size = layout, rank, world
        c = layout.coords(rank)
        self.dp, self.mp, self.ep, self.etp = layout.dp, layout.mp, layout.ep, layout.etp
        self.dp_rank, self.tp_rank, self.ep_rank, self.etp_rank = c["dp_rank"], c["tp_rank"], c["ep_rank"], \
            c["etp_rank"]
        self.vocab_ways = layout.vocab_ways
        self.vocab_rank = self.tp_rank if self.vocab_ways > 1 else 0
        self.tp_group = Group("tp", [self.dp_rank * self.mp + t for t in range(self.mp)], rank, world)
        self.dp_group = Group("dp", [d * self.mp + self.tp_rank for d in range(self.dp)], rank, world)
        self.world_group = Group("world", range(world), rank, world)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config):
        """The context of this rank, or None for a whole (single-process or training) model.

        The layout is checked first with the config and the process count (``checks.check_config_layout``:
        errors name the keys), then communication must be initialised."""
        layout = Layout.from_parallel_config(getattr(config, "parallel_config", None), training=False)
        if layout.world <= 1 or not config.use_past:
            return None
        from mindspore.communication import get_group_size, get_rank
        check_config_layout(config, devices=get_group_size() if comm_initialized() else None)
        if not comm_initialized():
            raise ConfigError(
                f"parallel_config describes {layout.world} ranks (data_parallel={layout.dp} x model_parallel="
                f"{layout.mp} x pipeline_stage={layout.pp}) but communication is not initialised: set "
                "use_parallel: True (build_context calls mindspore.communication.init()) and start one "
                f"process per rank with msrun --worker_num={layout.world}")
        if _parallel_mode() in ("semi_auto_parallel", "auto_parallel"):
            raise ConfigError(f"parallel.parallel_mode={_parallel_mode()!r}: predict splits the model itself "
                              "(frontend parallel); use parallel_mode: STAND_ALONE")
        return cls(layout, get_rank(), get_group_size())

    # ------------------------------------------------------------------ what this rank holds
    def param_slices(self, name, local_shape):
        """Per dim, the global (start, stop) this rank holds of parameter `name` (its local shape given),
        None for a dim held whole; None when the whole parameter is held (Layout.param_slices)."""
        return self.layout.param_slices(self.rank, name, local_shape)

    def expert_block(self, num_experts):
        """(first, count) of this rank's contiguous block of routed experts."""
        per = num_experts // self.ep
        return self.ep_rank * per, per

    def describe(self):
        return (f"rank {self.rank}/{self.world_size}: dp_rank {self.dp_rank}/{self.dp}, tp_rank {self.tp_rank}/"
                f"{self.mp}, ep_rank {self.ep_rank}/{self.ep}, etp_rank {self.etp_rank}/{self.etp}")

    def dp_slice(self, items):
        """This data-parallel rank's share of a global batch (a list or an array): rows
        [dp_rank * n / dp, (dp_rank + 1) * n / dp)."""
        n = len(items)
        if n % self.dp:
            raise ValueError(f"a batch of {n} is not divisible by parallel_config.data_parallel={self.dp}")
        per = n // self.dp
        return items[self.dp_rank * per:(self.dp_rank + 1) * per]
