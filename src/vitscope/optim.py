"""Muon for the encoder's weight matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each matrix's momentum by the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations. On the `fast` preset it
reaches a higher accuracy than AdamW in the same epochs (docs/performance.md#fast-recipe). Matrices of
one shape up to a transpose are orthogonalised together in one batched matmul chain: a ViT's blocks repeat
the same shapes, and fc1 (hidden, dim) is fc2 (dim, hidden) transposed, so a step costs 3 x 15 small bmm
calls instead of depth x 4 x 15.

The learning rate of the Muon groups is scaled by 0.2 * sqrt(max(rows, cols)), which gives updates of the
RMS AdamW's have (Liu et al. 2025, "Muon is scalable for LLM training"), so one schedule serves both.

This is torch.optim.Muon(lr, weight_decay, momentum, nesterov=True, adjust_lr_fn="match_rms_adamw") with its
default Newton-Schulz coefficients, steps and eps, except that torch orthogonalises in bfloat16 and divides by
max(norm, eps) where ours stays in the parameters' dtype and divides by norm + eps (tests/test_optim.py pins
ours to it). Ours, not torch's: its per-matrix, bfloat16 Newton-Schulz is slow on CPUs without native bf16
and changes the numbers we train with, and WholeStep needs the update as a function of tensors to trace.

The updates are functions of tensors only: the learning rate and the step count enter as 0-d tensors, so
with `compile=True` torch.compile traces Muon's update once and fuses its elementwise passes, whatever the
schedule does to the learning rate.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .compiled import CompiledOrEager

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the SVD G = U S V^T, for a batch of matrices (..., m, n), by a quintic
    Newton-Schulz iteration (coefficients from Jordan et al.)."""
    a, b, c = NS_COEFFICIENTS
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def muon_update(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor],
                lr: torch.Tensor, momentum: float, weight_decay: float, ns_steps: int) -> None:
    """One Muon step, in place, for matrices with their gradients and momentum buffers; `lr` a 0-d tensor."""
    torch._foreach_lerp_(buffers, grads, 1 - momentum)
    by_shape = defaultdict(list)  # (short side, long side) -> indices; tall matrices join as their transposes
    for i, p in enumerate(params):
        by_shape[(min(p.shape), max(p.shape))].append(i)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for (_, long_side), indices in by_shape.items():
        nesterov = torch.stack([_wide(grads[i]) for i in indices]).lerp_(
            torch.stack([_wide(buffers[i]) for i in indices]), momentum)  # (n, short, long)
        update = orthogonalize(nesterov, ns_steps) * (-lr * 0.2 * math.sqrt(long_side))
        torch._foreach_add_([_wide(params[i]) for i in indices], list(update.unbind(0)))


def _wide(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.mT if matrix.shape[0] > matrix.shape[1] else matrix


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: torch.Tensor, beta1: float,
                 beta2: float, eps: float, weight_decay: float, decoupled: bool = True) -> None:
    """One AdamW step, in place (decoupled weight decay, bias-corrected moments); `lr` a 0-d tensor and
    `steps` the parameters' 0-d step counts, which advance together. `decoupled=False` is Adam's L2 decay:
    the decay is added to the gradient instead."""
    torch._foreach_add_(steps, 1)
    step = steps[0].to(lr.device)  # torch.optim's Adam(W) keeps step counts on the CPU unless fused
    if weight_decay and decoupled:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    elif weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, (1 - beta2 ** step).sqrt())
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, -lr / (1 - beta1 ** step))
    torch._foreach_add_(params, updates)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with `muon=True` (2-D matrices) get Muon with Nesterov momentum; the others AdamW.
    Weight decay is decoupled in both. Plain per-parameter state, so checkpoints and resume work as for
    any torch optimizer. `compile=True` runs the Muon groups' update as a torch.compile'd function."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.95, ns_steps: int = 5, compile: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups must hold 2-D matrices only")
        self.register_load_state_dict_post_hook(MuonAdamW._steps_beside_params)
        # Muon's update (dozens of small ops and bmm) is compiled: it pays back within a run. AdamW's foreach
        # update stays eager: compiling it saves less per step than tracing it costs each new process.
        self.muon_update = CompiledOrEager(muon_update) if compile else muon_update

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # Filled on the device: a tensor made from a Python float would be a blocking copy to a GPU.
            lr = torch.full((), group["lr"], dtype=torch.float32, device=params[0].device)
            states = [self._state_of(p, group["muon"]) for p in params]
            if group["muon"]:
                self.muon_update(params, grads, [s["momentum_buffer"] for s in states], lr, group["momentum"],
                                 group["weight_decay"], group["ns_steps"])
            else:
                adamw_update(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                             [s["step"] for s in states], lr, *group["betas"], group["eps"], group["weight_decay"])
        return loss

    def _state_of(self, p: torch.Tensor, muon: bool) -> dict:
        """The state of `p`, made on first use. Step counts live beside their parameters, as torch's fused
        Adam keeps them: on a GPU the update then never reads the host, and a CUDA graph of the step replays
        it (`_steps_beside_params` moves a checkpoint's counts there)."""
        state = self.state[p]
        if not state:
            if muon:
                state["momentum_buffer"] = torch.zeros_like(p)
            else:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    @staticmethod
    def _steps_beside_params(optimizer: "MuonAdamW") -> None:
        """After load_state_dict, which keeps step counts on the CPU for an optimizer that is not fused: move
        them to their parameters' device."""
        for p, state in optimizer.state.items():
            if "step" in state and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)


class TensorUpdate:
    """An optimizer's update as a function of tensors and constants alone, for a graph that computes the
    gradients too (`vitscope.step.WholeStep`): `inputs()` gathers, eagerly, what each param group's update
    needs (its settings, its learning rate as a 0-d tensor, its state tensors), and `apply(params, grads,
    inputs)` runs the updates in place. It serves torch.optim's Adam and AdamW and MuonAdamW with the
    arithmetic of their own step (the same formulas; a fused torch kernel rounds a little differently), and
    keeps the moments in the optimizer's own state, made as the optimizer makes it: checkpoints,
    `load_state_dict` and the optimizer's own `step` go on working. `supports(optimizer)` says whether it
    can; settings it does not implement (amsgrad, maximize, ...) leave the optimizer to its own step."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        if not self.supports(optimizer):
            raise ValueError(f"no tensor update for {type(optimizer).__name__} with these settings")
        self.optimizer = optimizer
        self.position = {p: i for i, p in enumerate(params)}
        self.rates: dict[int, torch.Tensor] = {}  # per param group: its learning rate, on its parameters' device

    @staticmethod
    def supports(optimizer: torch.optim.Optimizer) -> bool:
        if isinstance(optimizer, MuonAdamW):
            return True
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return False
        unsupported = ("amsgrad", "maximize", "differentiable", "capturable")
        return not any(torch.is_tensor(group["lr"]) or any(group.get(flag) for flag in unsupported)
                       for group in optimizer.param_groups)

    def inputs(self) -> list[dict]:
        """Per param group: the positions of its parameters, its settings, its learning rate as a 0-d tensor
        (so a graph serves every step of the schedule) and its state tensors, created where the optimizer has
        not stepped yet. Gathered anew at every step: the schedule moves the rate, `load_state_dict` replaces
        the state. The rates are one 0-d tensor per group, kept and filled in place on the parameters' device:
        no copy from the host per step (on a GPU, a blocking one), and fixed addresses for a CUDA graph."""
        out = []
        for index, group in enumerate(self.optimizer.param_groups):
            muon = isinstance(self.optimizer, MuonAdamW) and group["muon"]
            states = [self._state_of(p, muon) for p in group["params"]]
            rate = self.rates.get(index)
            if rate is None:
                rate = self.rates[index] = torch.empty((), dtype=torch.float32, device=group["params"][0].device)
            rate.fill_(group["lr"])
            item = {"indices": [self.position[p] for p in group["params"]], "weight_decay": group["weight_decay"],
                    "lr": rate}
            if muon:
                item.update(momentum=group["momentum"], ns_steps=group["ns_steps"],
                            buffers=[state["momentum_buffer"] for state in states])
            else:
                item.update(betas=tuple(group["betas"]), eps=group["eps"],
                            decoupled=isinstance(self.optimizer, (MuonAdamW, torch.optim.AdamW))
                            or bool(group.get("decoupled_weight_decay")),
                            exp_avgs=[state["exp_avg"] for state in states],
                            exp_avg_sqs=[state["exp_avg_sq"] for state in states],
                            steps=[state["step"] for state in states])
            out.append(item)
        return out

    @staticmethod
    def apply(params: list[torch.Tensor], grads: list[torch.Tensor], inputs: list[dict]) -> None:
        """The update of every group, in place; `inputs` from `inputs()`."""
        for item in inputs:
            group_params, group_grads = [params[i] for i in item["indices"]], [grads[i] for i in item["indices"]]
            lr = item["lr"].to(group_params[0].device)
            if "buffers" in item:
                muon_update(group_params, group_grads, item["buffers"], lr, item["momentum"], item["weight_decay"],
                            item["ns_steps"])
            else:
                adamw_update(group_params, group_grads, item["exp_avgs"], item["exp_avg_sqs"], item["steps"], lr,
                             *item["betas"], item["eps"], item["weight_decay"], item["decoupled"])

    def _state_of(self, p: torch.Tensor, muon: bool) -> dict:
        if isinstance(self.optimizer, MuonAdamW):
            return self.optimizer._state_of(p, muon)
        state = self.optimizer.state[p]
        if not state:  # as torch.optim.Adam(W) makes it on its first step
            fused_on_device = self.optimizer.defaults.get("fused") and p.device.type != "cpu"
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused_on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


__all__ = ["MuonAdamW", "TensorUpdate", "adamw_update", "muon_update", "orthogonalize"]
