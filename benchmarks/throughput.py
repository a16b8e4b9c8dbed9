"""Training throughput (forward, backward, optimizer step) of vitscope and its peers, in one process.

    python benchmarks/throughput.py --size seed --json
    python benchmarks/throughput.py --size mid --impl vitscope,timm --all

Every implementation builds the same ViT (patch size, width, depth, heads, MLP width), gets random
in-memory images at the same batch size, and runs AdamW steps. Each is tried at each of its settings
(fp32 or bf16 autocast where the CPU has native bf16; each attention form the implementation has: fused
(F.scaled_dot_product_attention) or explicit, and vitscope's own CPU kernel; eager or torch.compile'd
when --compile, forward and loss as one graph for every implementation; on a GPU, peers' compiled graphs
also as CUDA graphs, mode "reduce-overhead", and vitscope's whole step replayed as one) and its best setting
is its row. --attention limits the attention forms tried.
Images/s is the median over --windows timed windows after a warm-up; the windows go round all settings
in turn, so the machine's drift in speed reaches every row alike (one untimed round goes first). The
vitscope row times `vitscope.train.make_train_step`, the very step `vitscope train` runs (uint8 images
in, normalised inside the step).

Peers need torchvision (timm, vit-pytorch): run this in the environment benchmarks/setup_env.sh makes.
One JSON object per line with --json: {"impl", "size", "batch", "dtype", "img_per_s", ...}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SIZES = {  # patch, dim, depth, heads, mlp
    "seed": dict(patch_size=7, dim=32, depth=3, heads=4, mlp_dim=128),
    "mid": dict(patch_size=4, dim=128, depth=6, heads=4, mlp_dim=512),
}
IMPLS = ["vitscope", "hf", "vit-pytorch", "timm"]


def size_preset(preset, size_name: str, config_module):
    """`preset` with a model size of this file's and the recipe of its vitscope step (AdamW at lr 1e-3, batch
    256, the default runtime settings), from `config_module`'s classes (vitscope.config, or another commit's in
    compare_commits.py; commits before the RuntimeConfig split kept those settings in TrainConfig)."""
    sized = dataclasses.replace(preset, name=f"{size_name} size", model=config_module.ViTConfig(**SIZES[size_name]),
                                train=config_module.TrainConfig(optimizer="adamw", lr=1e-3, batch_size=256))
    if hasattr(config_module, "RuntimeConfig"):
        sized = dataclasses.replace(sized, runtime=config_module.RuntimeConfig())
    return sized


def build_vitscope(size: dict, attention: str):
    from vitscope import RuntimeConfig, ViTConfig, build_model
    return build_model(ViTConfig(**size), RuntimeConfig(attention=attention))


def build_hf(size: dict, attention: str):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification
    config = HFConfig(image_size=28, patch_size=size["patch_size"], num_channels=1, hidden_size=size["dim"],
                      num_hidden_layers=size["depth"], num_attention_heads=size["heads"],
                      intermediate_size=size["mlp_dim"], num_labels=10,
                      attn_implementation="sdpa" if attention == "fused" else "eager")
    model = ViTForImageClassification(config)
    return LogitsOf(model, lambda m, x: m(pixel_values=x).logits)


def build_vit_pytorch(size: dict, attention: str):
    from vit_pytorch import ViT
    return ViT(image_size=28, patch_size=size["patch_size"], num_classes=10, dim=size["dim"], depth=size["depth"],
               heads=size["heads"], mlp_dim=size["mlp_dim"], channels=1, dim_head=size["dim"] // size["heads"])


def build_timm(size: dict, attention: str):
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=28, patch_size=size["patch_size"], in_chans=1, num_classes=10,
                              embed_dim=size["dim"], depth=size["depth"], num_heads=size["heads"],
                              mlp_ratio=size["mlp_dim"] / size["dim"])
    for block in model.blocks:
        block.attn.fused_attn = attention == "fused"
    return model


class LogitsOf(torch.nn.Module):
    """Wraps a model whose forward needs keyword arguments or returns a structure."""

    def __init__(self, model, call):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, x):
        return self.call(self.model, x)


BUILDERS = {"vitscope": build_vitscope, "hf": build_hf, "vit-pytorch": build_vit_pytorch, "timm": build_timm}
# The attention forms each implementation has. vit-pytorch's is explicit (matmul, softmax, matmul) only.
ATTENTIONS = {"vitscope": ["fused", "explicit", "kernel"], "hf": ["fused", "explicit"], "vit-pytorch": ["explicit"],
              "timm": ["fused", "explicit"]}


def peer_step(model, optimizer, dtype: str, compiled: bool | str, device: torch.device):
    """compiled: False, True (torch.compile's default mode) or a torch.compile mode ("reduce-overhead": the
    forward and backward graphs replayed as CUDA graphs, on a GPU)."""
    def forward_and_loss(images, labels):  # compiled as one graph, as vitscope's own step compiles it
        return F.cross_entropy(model(images).float(), labels)

    if compiled:
        forward_and_loss = torch.compile(forward_and_loss, mode=compiled if isinstance(compiled, str) else None)
    graphed = compiled == "reduce-overhead"

    def step(images, labels):
        if graphed:  # a new iteration: the graphs' outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = forward_and_loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def vitscope_step(model, dtype: str, compiled: bool | str, device: torch.device):
    """compiled: False, True, or "cuda-graph" (compiled, and replayed as a CUDA graph: RuntimeConfig.cuda_graph)."""
    from vitscope import RuntimeConfig, TrainConfig
    from vitscope.train import make_optimizer, make_scheduler, make_train_step
    config = TrainConfig(optimizer="adamw", lr=1e-3)
    runtime = RuntimeConfig(precision=dtype, compile=bool(compiled), cuda_graph=compiled == "cuda-graph")
    optimizer = make_optimizer(model, config, runtime)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=10**6)
    return make_train_step(model, optimizer, scheduler, config, runtime, model.config, device, dtype)


def prepare(impl: str, size_name: str, batch: int, dtype: str, attention: str, compiled: bool | str, warmup: int,
            device: torch.device) -> dict:
    """One setting of one implementation, built and warmed up (compiled where asked): its step and inputs."""
    size = SIZES[size_name]
    torch.manual_seed(0)
    model = BUILDERS[impl](size, attention).train().to(device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if impl == "vitscope":
        step = vitscope_step(model, dtype, compiled, device)
        images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8, device=device)
    else:
        # On a GPU, torch's fused AdamW (one kernel for all parameters), as vitscope's own step has it there.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda" or None)
        step = peer_step(model, optimizer, dtype, compiled, device)
        images = torch.randn(batch, 1, 28, 28, device=device)
    start = time.perf_counter()
    for _ in range(warmup):
        step(images, labels)
    synchronize(device)
    return {"row": {"impl": impl, "size": size_name, "batch": batch, "dtype": dtype, "attention": attention,
                    "fused_attention": attention == "fused",
                    "compiled": bool(compiled), "compile_mode": compiled if isinstance(compiled, str) else None,
                    "warmup_seconds": round(time.perf_counter() - start, 1)},
            "step": step, "inputs": (images, labels), "rates": []}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_window(setting: dict, steps: int, device: torch.device) -> None:
    images, labels = setting["inputs"]
    start = time.perf_counter()
    for _ in range(steps):
        setting["step"](images, labels)
    synchronize(device)
    setting["rates"].append(steps * len(labels) / (time.perf_counter() - start))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="seed")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated, of {IMPLS}")
    ap.add_argument("--dtype", default="auto", help="fp32, bf16, or auto: fp32 plus bf16 where the CPU has it natively")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off")
    ap.add_argument("--attention", default="", help="comma-separated attention forms to time (default: all each has)")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="steps per window (default: about 2 s worth)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--all", action="store_true", help="print every setting, not only each impl's best")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Each implementation's settings share its step's code, and torch.compile caches graphs per code object:
    # past its default of 8 recompilations it would run the rest eager, with only a warning on stderr.
    torch._dynamo.config.recompile_limit = 64
    from vitscope.compiled import avoid_known_compiler_bugs
    from vitscope.device import cpu_has_native_bf16, cpu_name
    from vitscope.process import keep_freed_memory
    # `vitscope train` keeps freed memory in the process (no page faults per step); set here, it serves every
    # implementation of this one process alike.
    keep_freed_memory()
    from vitscope import ViTConfig
    from vitscope.model import flops_per_image
    device = torch.device(args.device)
    if args.compile != "off":  # as `vitscope train` would, for every implementation of this process alike
        avoid_known_compiler_bugs(device)
    native_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    dtypes = (["fp32"] + (["bf16"] if native_bf16 else [])) if args.dtype == "auto" else args.dtype.split(",")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    train_flops = 3 * flops_per_image(ViTConfig(**SIZES[args.size]))
    steps = args.steps or (40 if args.size == "seed" or device.type == "cuda" else 4)
    context = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        context["gpu"] = torch.cuda.get_device_name()
    if not args.json:
        print(f"# {context}; training FLOPs per image {train_flops / 1e6:.2f} M", file=sys.stderr)

    def wanted(impl: str, attention: str) -> bool:
        if device.type != "cpu" and attention == "kernel":
            return False
        forms = [a for a in ATTENTIONS[impl] if not args.attention or a in args.attention.split(",")]
        return attention in (forms or ATTENTIONS[impl][:1])  # an implementation keeps at least one form

    def modes(impl: str, compiled: bool) -> list:
        # On a GPU every compiled setting is tried with CUDA graphs too: vitscope's replays its whole step,
        # the peers' torch.compile mode "reduce-overhead" their forward and backward graphs.
        if not (compiled and device.type == "cuda"):
            return [compiled]
        return [True, "cuda-graph" if impl == "vitscope" else "reduce-overhead"]

    settings = [prepare(impl, args.size, args.batch, dtype, attention, mode, 3 if mode else 2, device)
                for impl in args.impl.split(",") for dtype in dtypes
                for attention in ATTENTIONS[impl] if wanted(impl, attention)
                for compiled in compiles for mode in modes(impl, compiled)]
    # Windows go round the settings in turn, so a shared machine's drift in speed reaches all of them alike.
    # The first round is not timed: right after the setup, whichever setting ran first took a window 2-3x
    # slower than its others (every vitscope setting, which come first, in full runs on the Zen 4 host).
    for setting in settings:
        time_window(setting, steps, device)
        setting["rates"].clear()
    for _ in range(args.windows):
        for setting in settings:
            time_window(setting, steps, device)
    rows = []
    for setting in settings:
        row = dict(setting["row"], img_per_s=round(statistics.median(setting["rates"]), 1),
                   windows=[round(r, 1) for r in setting["rates"]])
        row.update(context, gflops=round(row["img_per_s"] * train_flops / 1e9, 1))
        rows.append(row)
    for impl in args.impl.split(","):
        mine = [row for row in rows if row["impl"] == impl]
        for row in mine if args.all else [max(mine, key=lambda r: r["img_per_s"])]:
            print(json.dumps(row) if args.json else row, flush=True)


if __name__ == "__main__":
    main()
