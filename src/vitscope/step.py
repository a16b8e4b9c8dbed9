"""The training step: a batch of uint8 images (B, H, W) and labels (B,) in, one optimizer update done, the
detached loss and the number of correct predictions out, as tensors, so the loop never waits on the device.

It comes in two forms with the same arithmetic, chosen by `make_train_step`:
- `WholeStep` (compile on and `RuntimeConfig.compile_whole_step`): the gradients by `torch.func.grad`, the
  clipping and the optimizer's update traced into one compiled graph. No autograd engine, no optimizer loop in
  Python, one call per step: where a step is a few ms of small matmuls that is much of its time
  (docs/performance.md#whole-step). With `RuntimeConfig.save_compiled_step` the compiled step is kept on disk
  and later processes load it instead of tracing it again (`compiled.precompiled`).
  With `RuntimeConfig.cuda_graph`, on a CUDA GPU, the compiled step is then recorded as a CUDA graph after its
  first calls (`CapturedStep`), and each later step is one replay of it instead of a launch from the host per
  kernel, for a model this small many short ones. Off by default until it has been measured on a GPU.
- the usual one: forward and loss compiled as one graph (or eager), then autograd's backward, clipping and
  the optimizer's own step.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from .compiled import CompiledOrEager, avoid_known_compiler_bugs, error_summary
from .config import RuntimeConfig, TrainConfig, ViTConfig
from .data import normalize
from .device import autocast
from .optim import TensorUpdate


def loss_of(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.softmax_before_loss:  # the blog's bug, kept for its preset: softmax, then CE's own log-softmax
        logits = logits.softmax(dim=-1)
    return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig,
                    runtime: RuntimeConfig, model_config: ViTConfig, device: torch.device, precision: str):
    """One optimisation step on a batch of uint8 images (B, H, W) and labels (B,): normalise, forward, loss,
    backward, clip, the optimizer's update, the scheduler's step. With `runtime.compile` "on" (`train` settles
    "auto" first) compiled: the whole step as one graph where `runtime.compile_whole_step` and the optimizer
    allow (`WholeStep`), else forward and loss as one graph (and Muon's update, compiled by `make_optimizer`).
    benchmarks/throughput.py times this very function."""
    compiled = runtime.compile == "on"
    if compiled:
        avoid_known_compiler_bugs(device)
    if compiled and runtime.compile_whole_step and TensorUpdate.supports(optimizer):
        return WholeStep(model, optimizer, scheduler, config, runtime, model_config, device, precision)
    mean, std = model_config.pixel_mean, model_config.pixel_std

    def forward(images: torch.Tensor, labels: torch.Tensor):
        logits = model(normalize(images, mean, std))
        return loss_of(logits.float(), labels, config), (logits.argmax(1) == labels).sum()

    forward_and_loss = CompiledOrEager(forward) if compiled else forward

    def train_step(images: torch.Tensor, labels: torch.Tensor):
        # Autocast around the compiled call, not in it: a graph that enters autocast itself is never taken
        # from the compile cache (torch 2.13), which costs seconds of tracing in every new process.
        with autocast(device, precision):
            loss, hits = forward_and_loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.detach(), hits

    train_step.compiled = forward_and_loss if compiled else None
    return train_step


class WholeStep:
    """Forward, loss, gradients (`torch.func.grad` over the model's parameters), gradient clipping and the
    optimizer's update (`optim.TensorUpdate`, on the optimizer's own state) as one torch.compile'd graph.

    The parameters enter as detached aliases of the model's own, and the update writes them in place: the
    model, its state_dict and the optimizer's state_dict stay what they would be after `optimizer.step()`.
    The learning rates enter as 0-d tensors, so one graph serves the whole schedule. `.grad` is left unset.
    If torch.compile fails, the same function runs eagerly (`CompiledOrEager`).

    Autocast is entered around the compiled call, as in the usual form: AOTAutograd's cache (torch 2.13)
    refuses a graph that enters autocast itself, and every process would trace the step anew. So under bf16
    autocast the update's matmuls (Muon's Newton-Schulz iterations) run in bf16 too, as Jordan's reference Muon
    runs them; the moments and the parameters stay fp32."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig,
                 runtime: RuntimeConfig, model_config: ViTConfig, device: torch.device, precision: str):
        self.model, self.optimizer, self.scheduler, self.config = model, optimizer, scheduler, config
        self.device, self.precision = device, precision
        self.mean, self.std = model_config.pixel_mean, model_config.pixel_std
        named = list(model.named_parameters())
        self.names, self.params = [name for name, _ in named], [p for _, p in named]
        self.update = TensorUpdate(optimizer, self.params)
        # What the compiled code reads from `self`, for the file of a saved step (compiled.precompiled): the model's
        # classes and its own config (`model_config` is the caller's word for it, and supplies the normalisation),
        # and the fast paths its modules take.
        reads = repr((type(model).__qualname__, getattr(model, "config", None), model_config, config.grad_clip,
                      config.label_smoothing, config.softmax_before_loss, fast_paths(model)))
        self.compiled = CompiledOrEager(self.step, saved_as=reads if runtime.save_compiled_step else None,
                                        fingerprint=self.fingerprint)
        # CUDA graph: wanted on a CUDA device; `graph` once captured; `graph_note` says what happened, for the log.
        self.graph_wanted = runtime.cuda_graph and device.type == "cuda"
        self.graph, self.graph_note, self.calls = None, None, 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        args = ([p.detach() for p in self.params], self.update.inputs(), images, labels)
        with autocast(self.device, self.precision):  # around the graph: see the class's docstring
            loss, hits = self._graphed(*args) if self.graph_wanted else self.compiled(*args)
        # What optimizer.step() would note for the scheduler, which otherwise warns that it steps first.
        self.optimizer._opt_called = True
        self.scheduler.step()
        return loss, hits

    def _graphed(self, params, update_inputs, images, labels):
        """The step through its CUDA graph: replayed where this call is the captured one (the same shapes,
        settings and tensors), captured after GRAPH_WARMUP_CALLS compiled calls, and otherwise, or where
        capturing fails, the compiled step as it is."""
        args = (params, update_inputs, images, labels)
        key = (self.fingerprint(*args), tuple(t.data_ptr() for t in _tensors(args[:2])))
        if self.graph is not None and self.graph.key == key:
            return self.graph.replay(images, labels)
        self.calls += 1
        if self.calls <= GRAPH_WARMUP_CALLS or self.compiled.source == "eager":
            return self.compiled(*args)
        elsewhere = _not_on(images.device, _tensors(args[:2]))
        if elsewhere:  # a tensor the graph would read or write on the host: its replays would not
            self.graph_wanted = False
            self.graph_note = f"no CUDA graph: {len(elsewhere)} of the step's tensors are not on {images.device}"
            return self.compiled(*args)
        try:
            self.graph = CapturedStep(self.compiled, args, key)
        except Exception as e:  # the step then runs as compiled, launch by launch
            self.graph_wanted, self.graph = False, None
            self.graph_note = f"no CUDA graph: capturing the step failed ({error_summary(e)})"
            warnings.warn(self.graph_note + "; training continues without it", stacklevel=3)
            return self.compiled(*args)
        self.graph_note = f"step captured as a CUDA graph at call {self.calls}; each later step replays it"
        return self.graph.replay(images, labels)

    def fingerprint(self, params: list[torch.Tensor], update_inputs: list[dict], images: torch.Tensor,
                    labels: torch.Tensor) -> tuple:
        """What the compiled step's guards check that could change from one call to the next: the mode and
        global state, the batch's shape, strides, dtype and device, every parameter's too, the state tensors'
        shapes and identities (`load_state_dict` replaces them) and the optimizer's settings. A loaded step
        checks its guards again only when this changes (`compiled.GuardedOnChange`)."""
        parts = [self.model.training, torch.is_grad_enabled(), torch.is_autocast_enabled(self.device.type),
                 torch.get_autocast_dtype(self.device.type)]
        parts += [(t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in (*params, images, labels)]
        for item in update_inputs:
            for key, value in item.items():
                if isinstance(value, list):
                    parts.append((key, *((id(v), v.shape, v.dtype, v.device) if torch.is_tensor(v) else v
                                          for v in value)))
                else:
                    parts.append((key, (value.shape, value.dtype) if torch.is_tensor(value) else value))
        return tuple(parts)

    def step(self, params: list[torch.Tensor], update_inputs: list[dict], images: torch.Tensor, labels: torch.Tensor):
        grads, (loss, hits) = torch.func.grad(self.loss, has_aux=True)(params, images, labels)
        if self.config.grad_clip > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = (self.config.grad_clip / (norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ does
            grads = [g * scale for g in grads]
        TensorUpdate.apply(params, grads, update_inputs)
        return loss, hits

    def loss(self, params: list[torch.Tensor], images: torch.Tensor, labels: torch.Tensor):
        logits = torch.func.functional_call(self.model, dict(zip(self.names, params)),
                                            (normalize(images, self.mean, self.std),))
        loss = loss_of(logits.float(), labels, self.config)
        return loss, (loss.detach(), (logits.argmax(1) == labels).sum())


def fast_paths(model: torch.nn.Module) -> list:
    """Each module's class and fast-path settings (fastpath.accelerate): what its compiled code depends on beyond
    the model's config."""
    settings = ("implementation", "kernel", "bias_in_kernel")
    return [(name, type(module).__qualname__, *(getattr(module, s, None) for s in settings))
            for name, module in model.named_modules() if any(hasattr(module, s) for s in settings)]


GRAPH_WARMUP_CALLS = 3  # compiled calls before the capture: compilation, cuBLAS's handles and workspaces


def _tensors(items) -> list[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    return [leaf for leaf in tree_leaves(items) if torch.is_tensor(leaf)]


def _not_on(device: torch.device, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors not on `device` ("cuda" and "cuda:0" are one device when 0 is the current one)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return [t for t in tensors if t.device != device]


class CapturedStep:
    """A compiled whole step recorded as one CUDA graph (`torch.cuda.CUDAGraph`), replayed per batch.

    A replay runs the recorded kernels on the recorded addresses: the parameters, the optimizer's state and
    the learning rates are updated where they live (`TensorUpdate` keeps the rates in place on the device),
    and the batch is copied into the buffers the graph reads. Capturing records without running, so the
    call that captures then replays once for its own batch. The loss and the count of hits come back as
    copies: the graph's own outputs are overwritten by the next replay."""

    def __init__(self, step, args: tuple, key):
        params, update_inputs, images, labels = args
        self.key, self.images, self.labels = key, images.clone(), labels.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.hits = step(params, update_inputs, self.images, self.labels)

    def replay(self, images: torch.Tensor, labels: torch.Tensor):
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss.clone(), self.hits.clone()
