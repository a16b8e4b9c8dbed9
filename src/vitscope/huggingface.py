"""Our ViT in Hugging Face `transformers`' layout, both ways: `ViTForImageClassification`'s config.json,
preprocessor_config.json and model.safetensors.

transformers' image pipelines convert every image to RGB, so a grayscale model is written with three input
channels: its patch filters spread over R, G and B in the proportions of PIL's `convert("L")` (ITU-R 601
luma). A grey image made RGB then gives the model's own logits, and a colour image the logits of its luma,
as `vitscope predict` sees it. Loading sums the three filters back into one channel, exactly.

No import of transformers here: the files are written and read directly, in the layout the Hub's ViT
checkpoints use (`vit.encoder.layer.i.attention.attention.query`, ...). That layout is what every
transformers version loads and what `save_pretrained` writes, so one mapping serves both directions.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ViTConfig
from .errors import VitscopeError
from .model import ViT

# Our LayerNorms use timm's eps; transformers' ViT defaults to 1e-12, so the config must say 1e-6.
LAYER_NORM_EPS = 1e-6
# transformers' ViTConfig defaults: its config.json may leave out any field that has its default value.
HF_VIT_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                   "hidden_dropout_prob": 0.0, "layer_norm_eps": 1e-12, "qkv_bias": True, "num_labels": 2}
# ViTImageProcessor's defaults: what transformers feeds a ViT directory that has no preprocessor config.
DEFAULT_IMAGE_MEAN = DEFAULT_IMAGE_STD = 0.5
# R, G, B weights of PIL's convert("L"); they sum to 1, so R = G = B = v gives v.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# config.json key marking a grayscale vitscope model spread over RGB (value: LUMA_WEIGHTS), for the loader to fold.
GRAYSCALE_KEY = "vitscope_grayscale_weights"
PATCH_FILTERS = "vit.embeddings.patch_embeddings.projection.weight"  # (D, C, P, P)


def is_hf_directory(path: str | Path) -> bool:
    """A directory whose config.json declares a transformers ViT (`"model_type": "vit"`)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "vit"
    except (OSError, ValueError, AttributeError):
        return False


def weight_names(depth: int) -> dict[str, str]:
    """Our parameter name -> transformers' name, except the fused q/k/v, which becomes three tensors."""
    names = {
        "patch_embed.proj.weight": PATCH_FILTERS,
        "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
        "cls_token": "vit.embeddings.cls_token",
        "pos_embed": "vit.embeddings.position_embeddings",
        "norm.weight": "vit.layernorm.weight",
        "norm.bias": "vit.layernorm.bias",
        "head.weight": "classifier.weight",
        "head.bias": "classifier.bias",
    }
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for part, hf_part in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                              ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                              ("mlp.fc2", "output.dense")):
            for kind in ("weight", "bias"):
                names[f"{ours}{part}.{kind}"] = f"{theirs}{hf_part}.{kind}"
    return names


def _qkv_names(i: int, kind: str) -> list[str]:
    return [f"vit.encoder.layer.{i}.attention.attention.{part}.{kind}" for part in ("query", "key", "value")]


def to_hf_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    hf = {theirs: state[ours] for ours, theirs in weight_names(depth).items()}
    for i in range(depth):
        for kind in ("weight", "bias"):
            # timm's fused qkv stacks [q; k; v] along the output dim: (3D, D) and (3D,), heads contiguous
            # inside each third, which is the head order of transformers' separate projections.
            for name, tensor in zip(_qkv_names(i, kind), state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                hf[name] = tensor
    return {name: tensor.detach().cpu().contiguous() for name, tensor in hf.items()}


def spread_over_rgb(filters: torch.Tensor) -> torch.Tensor:
    """Patch filters (D, 1, P, P) -> (D, 3, P, P) in luma proportions. Blue takes what red and green leave, so
    the channels, summed in order, give back the grey filters bit for bit (the subtraction is exact: Sterbenz)."""
    red, green = filters * LUMA_WEIGHTS[0], filters * LUMA_WEIGHTS[1]
    return torch.cat([red, green, filters - (red + green)], dim=1)


def is_spread_grayscale(record: dict) -> bool:
    """Whether a config.json is a grayscale vitscope model written with 3 channels, to be folded back to 1."""
    return GRAYSCALE_KEY in record and record.get("num_channels") == 3


def fold_rgb(filters: torch.Tensor) -> torch.Tensor:
    """(D, 3, P, P) -> (D, 1, P, P): what the filters compute on a grey image given as R = G = B."""
    return filters[:, 0:1] + filters[:, 1:2] + filters[:, 2:3]


def from_hf_state_dict(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    expected = set(weight_names(depth).values()) | {n for i in range(depth) for kind in ("weight", "bias")
                                                     for n in _qkv_names(i, kind)}
    missing, unexpected = sorted(expected - hf.keys()), sorted(hf.keys() - expected)
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise VitscopeError(f"these weights are not a ViTForImageClassification vitscope can load "
                            f"({len(missing)} missing, {len(unexpected)} unexpected; {problem})")
    state = {ours: hf[theirs] for ours, theirs in weight_names(depth).items()}
    for i in range(depth):
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([hf[n] for n in _qkv_names(i, kind)])
    return state


def require_representable(config: ViTConfig) -> None:
    if config.architecture != "vit":
        raise VitscopeError(f"transformers' ViT cannot represent the {config.architecture!r} architecture (no class "
                            "token, a Linear position embedding, ReLU); export it with --format onnx")


def hf_config(config: ViTConfig, class_names: list[str]) -> dict:
    """transformers' ViTConfig fields for our model (what `save_pretrained` would write); a grayscale model is
    declared with 3 channels and marked with GRAYSCALE_KEY."""
    require_representable(config)
    grayscale = config.in_channels == 1
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": 3 if grayscale else config.in_channels,
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu",  # exact (erf) GELU, as our nn.GELU()
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": 0.0,  # our attention has no dropout on its weights
        "layer_norm_eps": LAYER_NORM_EPS,
        "qkv_bias": True,
        "initializer_range": 0.02,
        "encoder_stride": config.patch_size,
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: i for i, name in enumerate(class_names)},
        **({GRAYSCALE_KEY: list(LUMA_WEIGHTS)} if grayscale else {}),
    }


def preprocessor_config(config: ViTConfig) -> dict:
    """ViTImageProcessor settings that turn any image into the model's input: make it RGB (a grayscale model
    reads RGB, see above), resize it to the model's size (bilinear; a no-op at that size), scale to [0, 1],
    normalise as in training. One mean/std per channel."""
    channels = 3 if config.in_channels == 1 else config.in_channels
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": channels == 3,
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "resample": 2,  # PIL bilinear, ViTImageProcessor's default
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [config.pixel_mean] * channels,
        "image_std": [config.pixel_std] * channels,
    }


def save_hf_directory(model: ViT, config: ViTConfig, out: str | Path, class_names: list[str]) -> Path:
    """config.json, preprocessor_config.json and model.safetensors that transformers loads as it is."""
    out = Path(out)
    config_record = hf_config(config, class_names)
    hf_state = to_hf_state_dict(model.state_dict(), config.depth)
    if config.in_channels == 1:
        hf_state[PATCH_FILTERS] = spread_over_rgb(hf_state[PATCH_FILTERS])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_record, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config), indent=2) + "\n")
    # transformers refuses a safetensors file whose metadata does not name its framework.
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _single(value, name: str):
    """transformers allows image_size/patch_size as an int or a pair; we need a square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise VitscopeError(f"{name} {value} is not square; vitscope's ViT needs square images and patches")
        return value[0]
    return value


def _per_channel(value) -> list[float]:
    """image_mean / image_std: a list with one value per channel, or one number for all."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def vit_config_from_hf(record: dict, preprocessor: dict | None) -> ViTConfig:
    """Our ViTConfig for a transformers ViT config, refusing what our ViT cannot compute exactly."""
    record = {**HF_VIT_DEFAULTS, **record}
    for field, ours in (("hidden_act", "gelu"), ("qkv_bias", True), ("layer_norm_eps", LAYER_NORM_EPS)):
        if record[field] != ours:
            raise VitscopeError(f"this Hugging Face ViT has {field}={record[field]!r}; vitscope's ViT computes only "
                                f"{field}={ours!r}, so its logits would differ")
    hidden, heads = record["hidden_size"], record["num_attention_heads"]
    if record.get("head_dim", hidden // heads) * heads != hidden:
        raise VitscopeError(f"head_dim {record['head_dim']} x {heads} heads != hidden_size {hidden}")
    preprocessor = preprocessor or {}
    mean, std = (_per_channel(preprocessor.get(key, default))
                 for key, default in (("image_mean", DEFAULT_IMAGE_MEAN), ("image_std", DEFAULT_IMAGE_STD)))
    if len(set(mean)) != 1 or len(set(std)) != 1:
        raise VitscopeError(f"per-channel normalisation {mean}/{std} differs by channel; vitscope's ViTConfig "
                            "has one pixel_mean and pixel_std")
    config = ViTConfig(image_size=_single(record["image_size"], "image_size"),
                       patch_size=_single(record["patch_size"], "patch_size"),
                       in_channels=1 if is_spread_grayscale(record) else record["num_channels"],
                       num_classes=len(record["id2label"]) if "id2label" in record else record["num_labels"],
                       dim=hidden, depth=record["num_hidden_layers"], heads=heads, mlp_dim=record["intermediate_size"],
                       dropout=record["hidden_dropout_prob"], architecture="vit", pixel_mean=mean[0], pixel_std=std[0])
    config.validate()
    return config


def load_hf_directory(path: str | Path) -> tuple[ViT, ViTConfig]:
    """(model, config) from a transformers ViTForImageClassification directory. Weights come only from
    model.safetensors: pytorch_model.bin is a pickle, and unpickling a file someone sent can run code."""
    path = Path(path)
    try:
        record = json.loads((path / "config.json").read_text())
        preprocessor_file = path / "preprocessor_config.json"
        preprocessor = json.loads(preprocessor_file.read_text()) if preprocessor_file.is_file() else None
    except (OSError, ValueError) as e:
        raise VitscopeError(f"cannot read the Hugging Face config in {path}: {e}") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f"; it holds {pickled[0]}, a pickle that could run code when loaded, which vitscope never "
                "unpickles (convert it to safetensors where you trust it)") if pickled else ""
        raise VitscopeError(f"{path} has no model.safetensors{hint}")
    config = vit_config_from_hf(record, preprocessor)
    try:
        hf_state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise VitscopeError(f"cannot read {weights}: {e}") from None
    if is_spread_grayscale(record) and PATCH_FILTERS in hf_state:
        hf_state[PATCH_FILTERS] = fold_rgb(hf_state[PATCH_FILTERS])
    model = ViT(config)
    try:
        model.load_state_dict(from_hf_state_dict(hf_state, config.depth))
    except RuntimeError as e:  # the shapes disagree with config.json
        raise VitscopeError(f"weights in {weights} do not fit its config.json: {str(e).splitlines()[-1].strip()}") \
            from None
    return model, config
