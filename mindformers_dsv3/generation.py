"""Stock MindFormers ``generate`` on a CPU: host-side logits processing and prompt checks.

Stock ``GenerationMixin`` (MindFormers 1.7.0) post-processes logits with ``mint`` ops unless the
MindFormers context says ``postprocess_use_numpy: True``; ``mint.topk`` and ``mint.sort`` have no
CPU kernel, so every ``do_sample=True`` call (``TopPLogitsWarper`` is always in the list, even
for ``top_p=1.0``) fails on a CPU with ``The kernel SortExt unregistered``. Each stock processor
also has a numpy implementation (``process_np``); :class:`HostGenerationMixin` selects it off
Ascend, without forking MindFormers and without needing a MindFormers context.

Stock ``generate`` also answers bad prompts with errors that do not say what is wrong (an empty
prompt: ``cannot reshape array of size 0``; a prompt of exactly ``seq_length`` tokens:
``IndexError``; a longer one: ``max_length ... You shout set max_length``), and when the paged
cache runs out (``block pool is out of memory``) it leaves the blocks allocated, so every later
call fails too. :class:`HostGenerationMixin` checks prompts first (:func:`normalize_prompts`) and
releases the cache blocks when a call fails. It also accepts ``eos_token_id=<int>`` (stock
``generate`` needs a list there: ``argument of type 'int' is not iterable``) and a batch of prompts
of different lengths.

Use: ``class DeepseekV3ForCausalLM(HostGenerationMixin, DeepseekV3PreTrainedModel)`` (the mixin
first, so its ``generate`` wraps the stock one).
"""
import numbers

import numpy as np
from mindspore import Tensor, nn

from mindformers_dsv3.kernels import on_ascend

__all__ = ["HostGenerationMixin", "host_argmax", "normalize_prompts", "run_on_host"]

_OUT_OF_BLOCKS = "block pool is out of memory"


def run_on_host(processors):
    """Make a stock ``LogitsProcessorList`` run the numpy implementation of its processors.

    Processors that implement ``process_np`` (all stock ones) are switched to it; the list is
    changed in place and returned.
    """
    from mindformers.generation.logits_process import LogitsProcessor

    processors.use_numpy = True
    for processor in processors:
        if type(processor).process_np is not LogitsProcessor.process_np:
            processor.use_numpy = True
    return processors


def host_argmax(logits, axis=-1):
    """Argmax of host (numpy) or device logits as an int32 ``Tensor`` (first index on ties, as
    MindSpore's ``Argmax``). Stock greedy search calls ``self.argmax(logits, -1).asnumpy()`` once per
    token; on a CPU a device op there costs about 1.5 ms of dispatch for a microsecond of work."""
    if isinstance(logits, Tensor):
        logits = logits.asnumpy()
    return Tensor.from_numpy(np.ascontiguousarray(np.argmax(logits, axis).astype(np.int32)))


def _rows(input_ids):
    """The prompts as a list of 1-D int arrays (a single prompt or a batch, ragged allowed)."""
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.asnumpy()
    if input_ids is None:
        raise ValueError("empty prompt: generate got input_ids=None; pass token ids (a list of ints, "
                         "or a list of such lists for a batch)")
    if isinstance(input_ids, np.ndarray):
        if input_ids.ndim == 0:
            raise ValueError(f"input_ids must be a list of token ids, got the scalar {input_ids.item()!r}")
        if input_ids.size == 0:
            raise ValueError(f"empty prompt: generate got input_ids of shape {input_ids.shape} (no token ids)")
        return list(input_ids.reshape(-1, input_ids.shape[-1]))
    if isinstance(input_ids, (str, bytes)):
        raise TypeError("generate takes token ids, not text: encode the prompt with the tokenizer, or use "
                        "pipeline('text_generation', model=..., tokenizer=...)")
    input_ids = list(input_ids)
    if not input_ids:
        raise ValueError("empty prompt: generate got an empty list of token ids")
    if all(isinstance(x, (numbers.Integral, np.integer)) for x in input_ids):
        return [np.asarray(input_ids)]
    return [np.asarray(row.asnumpy() if isinstance(row, Tensor) else row) for row in input_ids]


def normalize_prompts(input_ids, seq_length, pad_token_id, vocab_size=None):
    """Check the prompts for stock ``generate`` and return them as one right-padded int32 array.

    ``input_ids``: one prompt (ints) or a batch (rows of ints, different lengths allowed: shorter
    rows are padded with ``pad_token_id``; stock ``generate`` needs them padded). As in stock
    ``generate``, a row's length is up to its last token that is not ``pad_token_id``; trailing pad
    columns past the longest prompt are dropped.

    Raises ``ValueError`` naming the problem: an empty prompt (no tokens, or only ``pad_token_id``),
    a prompt that leaves no room under ``seq_length``, or a token id outside ``[0, vocab_size)``.
    """
    rows = _rows(input_ids)
    lengths = []
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {row.shape}")
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise TypeError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
        if row.size == 0:
            raise ValueError(f"empty prompt: prompt {i} has no token ids (with the DeepSeek tokenizer an "
                             "empty text still encodes to [BOS] unless add_special_tokens=False)")
        valid = np.flatnonzero(row != pad_token_id)
        if valid.size == 0:
            raise ValueError(f"empty prompt: prompt {i} holds only pad_token_id={pad_token_id}, which "
                             "generate strips as padding")
        length = int(valid[-1]) + 1
        if length >= seq_length:
            raise ValueError(f"prompt {i} has {length} tokens but seq_length={seq_length}: a prompt may have "
                             f"at most seq_length - 1 = {seq_length - 1} tokens so that at least one token "
                             "can be generated; shorten the prompt or raise seq_length (YAML "
                             "model_config.seq_length)")
        if vocab_size is not None and (row[:length].min() < 0 or row[:length].max() >= vocab_size):
            bad = row[:length][(row[:length] < 0) | (row[:length] >= vocab_size)]
            raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary "
                             f"[0, vocab_size={vocab_size})")
        lengths.append(length)
    out = np.full((len(rows), max(lengths)), pad_token_id, dtype=np.int32)
    for i, (row, length) in enumerate(zip(rows, lengths)):
        out[i, :length] = row[:length]
    return out


class HostGenerationMixin:
    """Stock ``generate`` / ``pipeline("text_generation")`` made CPU-safe for a MindFormers model.

    Put it before the ``PreTrainedModel`` base. It needs ``self.config`` with ``seq_length``,
    ``pad_token_id`` and ``vocab_size``, as every MindFormers LM config has.
    """

    def get_logits_processor(self, generation_config, input_ids_seq_length, logits_processor):
        processors = super().get_logits_processor(generation_config, input_ids_seq_length, logits_processor)
        return processors if on_ascend() else run_on_host(processors)

    def get_logits_warper(self, generation_config):
        warpers = super().get_logits_warper(generation_config)
        return warpers if on_ascend() else run_on_host(warpers)

    # -------------------------------------------------------------- per-token host cost
    # Stock generate calls the model once per token and post-processes its logits on the host.
    # Off Ascend the model's logits come back to numpy right after the call (gathered at the rows
    # stock `postprocess` would pick), so the per-token reshape / gather / argmax run in numpy
    # instead of as device ops dispatched one by one (about 2 ms per token on a CPU).
    def forward(self, *args, **kwargs):
        res, current_index = super().forward(*args, **kwargs)
        if on_ascend() or not isinstance(res, Tensor):
            return res, current_index
        logits = res.asnumpy()
        logits = logits.reshape(-1, logits.shape[-1])
        if current_index is not None and logits.shape[0] > len(current_index):
            logits = logits[np.asarray(current_index)]
        return logits, current_index

    @property
    def compile_phase(self):
        return nn.Cell.compile_phase.fget(self)

    @compile_phase.setter
    def compile_phase(self, value):
        # MindSpore sets the compile phase on every call and its setter walks every sub-cell (122 in
        # the tiny model; about 7 ms per decoded token there); the sub-cells already hold the value
        # when it is unchanged. See docs/en/architecture.md (patches).
        if value != nn.Cell.compile_phase.fget(self):
            nn.Cell.compile_phase.fset(self, value)

    def _generation_pad_token_id(self, generation_config, kwargs):
        for pad in (kwargs.get("pad_token_id"), getattr(generation_config, "pad_token_id", None),
                    getattr(self.config, "pad_token_id", None)):
            if pad is not None:
                return int(pad)
        return 0  # stock generate's default

    def generate(self, input_ids, generation_config=None, logits_processor=None, streamer=None, seed=None,
                 **kwargs):
        """Stock ``GenerationMixin.generate`` after :func:`normalize_prompts`; see its docstring."""
        if isinstance(kwargs.get("eos_token_id"), (numbers.Integral, np.integer)):
            kwargs["eos_token_id"] = [int(kwargs["eos_token_id"])]  # stock checks `token in eos_token_id`
        pad = self._generation_pad_token_id(generation_config, kwargs)
        input_ids = normalize_prompts(input_ids, self.config.seq_length, pad,
                                      getattr(self.config, "vocab_size", None))
        lengths = [int(np.flatnonzero(row != pad)[-1]) + 1 for row in input_ids]
        room = self._room(generation_config, kwargs, lengths)
        if not all(room):   # stock would generate past a limit that leaves no room (up to seq_length)
            return self._without_full_rows(input_ids, lengths, room, generation_config, kwargs,
                                           logits_processor, streamer, seed)
        try:
            if getattr(self.config, "num_speculative_tokens", 0):   # MTP drafts (mindformers_dsv3/speculative.py)
                from mindformers_dsv3 import speculative
                return speculative.generate(self, input_ids, generation_config, logits_processor, streamer, seed,
                                            **kwargs)
            return super().generate(input_ids, generation_config=generation_config,
                                    logits_processor=logits_processor, streamer=streamer, seed=seed, **kwargs)
        except BaseException as err:
            block_mgr = getattr(self, "block_mgr", None)
            if block_mgr is not None:
                block_mgr.clear_cache()  # stock leaves the blocks allocated: later calls would fail
            if isinstance(err, RuntimeError) and _OUT_OF_BLOCKS in str(err):
                slots = block_mgr.num_blocks * block_mgr.block_size
                raise RuntimeError(
                    f"the paged KV cache is too small for this batch: num_blocks={block_mgr.num_blocks} x "
                    f"block_size={block_mgr.block_size} = {slots} token slots, while {len(input_ids)} "
                    f"sequence(s) may each need up to seq_length={block_mgr.seq_length}; raise num_blocks "
                    "(YAML model_config.num_blocks), or generate fewer prompts or tokens at once"
                ) from err
            raise

    # -------------------------------------------------------------- length limits that leave no room
    def _room(self, generation_config, kwargs, lengths):
        """Per prompt: whether max_new_tokens / max_length (as stock generate reads them) let it
        grow. Stock stops a row only when it reaches the limit *after* a token, so a row already at
        the limit (``max_new_tokens=0``, ``max_length`` = its length) would run on to seq_length."""
        if generation_config is None:
            from mindformers.core.context import is_legacy_model
            from mindformers.generation.generation_config import GenerationConfig
            generation_config = GenerationConfig.from_model_config(self.config) if is_legacy_model() \
                else self.generation_config
        max_new = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        if max_new is not None:
            if not isinstance(max_new, (numbers.Integral, np.integer)) or isinstance(max_new, bool) or max_new < 0:
                raise ValueError(f"max_new_tokens={max_new!r} must be an int >= 0 (0 returns the prompt)")
            return [max_new > 0] * len(lengths)
        max_length = kwargs.get("max_length", getattr(generation_config, "max_length", None))
        if max_length is None:
            return [True] * len(lengths)
        if not isinstance(max_length, (numbers.Integral, np.integer)) or isinstance(max_length, bool):
            raise ValueError(f"max_length={max_length!r} must be an int (prompt plus generated tokens)")
        return [length < max_length for length in lengths]

    def _without_full_rows(self, input_ids, lengths, room, generation_config, kwargs, logits_processor,
                           streamer, seed):
        """Rows with no room come back as their prompt; the others are generated as a batch."""
        out = [input_ids[i, :length].astype(np.int32) for i, length in enumerate(lengths)]
        grow = [i for i, ok in enumerate(room) if ok]
        wants_dict = kwargs.get("return_dict_in_generate", getattr(generation_config, "return_dict_in_generate",
                                                                    False))
        if grow and (wants_dict or streamer is not None):
            raise ValueError(f"max_length={kwargs.get('max_length', getattr(generation_config, 'max_length', None))}"
                             f" leaves no room after prompt(s) {[i for i in range(len(room)) if not room[i]]} "
                             "while others can grow: with return_dict_in_generate or a streamer, generate "
                             "them apart, or use max_new_tokens")
        if grow:
            rows = input_ids[grow]
            done = self.generate(rows[:, :max(lengths[i] for i in grow)], generation_config=generation_config,
                                 logits_processor=logits_processor, streamer=streamer, seed=seed, **kwargs)
            for i, seq in zip(grow, done):
                out[i] = seq
        elif streamer is not None:
            streamer.put(input_ids)
            streamer.end()
        if wants_dict:
            from mindformers.generation.utils import GenerateOutput
            return GenerateOutput(sequences=out, scores=None, logits=None)
        return out
