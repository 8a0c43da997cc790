"""Starting from trained weights: nanoGPT checkpoints and Hugging Face GPT-2.

Weights load into the one `GPT` class; looping keys (`LOOP_KEYS`) may then be switched on, so
that the middle blocks of a trained model can be looped and fine-tuned:

    model = from_pretrained("gpt2", loop_center_idx=5, loop_radius=1, max_loops=2)

GPT-2 comes from a Hugging Face model name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`;
needs `transformers`, i.e. `pip install 'blockloop[online]'`, and a network) or from a local
directory written by `save_pretrained` or downloaded from the hub (`config.json` plus
`model.safetensors` or `pytorch_model.bin`, possibly sharded), which needs no network and no
`transformers` (only the `safetensors` package, for `.safetensors` files). Reading never runs
code from a file: safetensors files are raw tensors behind a JSON header, and `.bin` files and
nanoGPT checkpoints go through `torch.load(weights_only=True)`.

Hugging Face's GPT-2 differs from `GPT` only in storage: its four projection matrices are
`Conv1D` weights of shape (in, out), the transpose of `nn.Linear`'s; its files may lack the
`transformer.` prefix (weights saved from the bare `GPT2Model`, as the hub's original uploads)
and may carry the attention buffers `attn.bias` (causal mask) and `attn.masked_bias`, which
`GPT` does not need. Its MLP uses the tanh approximation of GELU (`gelu_new`), which the
imported model keeps (`gelu_approximate="tanh"`) so that its logits are Hugging Face's.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from blockloop.checkpoint import CheckpointError, read_nanogpt_checkpoint
from blockloop.errors import ConfigError
from blockloop.model import GPT, LOOP_KEYS, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Weight files in the order they are looked for; an `.index.json` maps names to shard files.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_CONV1D_WEIGHTS = (
    "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
)
_HF_ATTENTION_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Hugging Face activation name -> nn.GELU's `approximate`.
_HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


# Said when RoPE is asked for on weights trained with learned positions (GPT-2, nanoGPT).
ROPE_ON_TRAINED_WEIGHTS = (
    "position_embedding: these weights were trained with learned positions (wpe); "
    "position_embedding='rope' needs a model trained with it from scratch"
)


def _check_loop_overrides(overrides: dict) -> None:
    if overrides.get("position_embedding", "learned") != "learned":
        raise ConfigError(ROPE_ON_TRAINED_WEIGHTS)
    unknown = sorted(set(overrides) - set(LOOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: only looping keys can change when loading trained weights "
            f"(allowed: {', '.join(LOOP_KEYS)})"
        )


def _load_weights(model: GPT, state_dict: dict, source) -> None:
    """Copy `state_dict` into `model`, refusing any missing, extra or mis-shaped tensor."""
    expected = model.state_dict()
    # Adapters of a newly switched-on concat loop are the only weights a trained model lacks.
    missing = [k for k in expected if k not in state_dict and not k.startswith("looper.")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{source}: the weights do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]})"
        )
    model.load_state_dict(state_dict, strict=False)


def from_nanogpt_checkpoint(path: str | Path, map_location="cpu", **loop_overrides) -> GPT:
    """A GPT with the weights of nanoGPT's `ckpt.pt` (same logits), optionally looped."""
    _check_loop_overrides(loop_overrides)
    model_args, state_dict, _ = read_nanogpt_checkpoint(path, map_location=map_location)
    model = GPT(GPTConfig(**model_args, **loop_overrides))
    _load_weights(model, state_dict, path)
    return model


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2


def gpt_config_args_from_hf(hf_config: dict, source="the Hugging Face config") -> dict:
    """`GPTConfig` arguments for a Hugging Face GPT-2 config (the dict of its `config.json`).

    Refuses GPT-2 variants whose computation `GPT` does not reproduce, naming the field.
    """
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        if not isinstance(hf_config.get(key), int):
            raise CheckpointError(f"{source}: '{key}' is missing or not an integer")
    n_embd = hf_config["n_embd"]
    # (field, default when absent, accepted values, what GPT computes)
    supported = (
        ("model_type", "gpt2", ("gpt2",), "a GPT-2 model"),
        ("activation_function", "gelu_new", tuple(_HF_GELU), "GELU, exact or tanh"),
        ("n_inner", None, (None, 4 * n_embd), "an MLP of width 4 * n_embd"),
        ("layer_norm_epsilon", 1e-5, (1e-5,), "LayerNorm with eps 1e-5"),
        ("scale_attn_weights", True, (True,), "attention scaled by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", False, (False,), "no per-layer attention scaling"),
        ("add_cross_attention", False, (False,), "no cross-attention"),
        ("tie_word_embeddings", True, (True,), "the output head tied to the token embedding"),
    )
    for key, default, accepted, meaning in supported:
        value = hf_config.get(key, default)
        if value not in accepted:
            raise CheckpointError(
                f"{source}: {key}={value!r} is not supported; blockloop's GPT computes {meaning} "
                f"({key} in {list(accepted)})"
            )
    return dict(
        vocab_size=hf_config["vocab_size"],
        block_size=hf_config["n_positions"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=n_embd,
        bias=True,
        # Hugging Face's dropout rates are for its own training; fine-tuning, like nanoGPT's
        # GPT-2 import, starts without dropout.
        dropout=0.0,
        gelu_approximate=_HF_GELU[hf_config.get("activation_function", "gelu_new")],
    )


def gpt_state_dict_from_hf(hf_state: dict, source="the Hugging Face weights") -> dict:
    """A Hugging Face GPT-2 state dict renamed and transposed into `GPT`'s layout."""
    state = {}
    for key, tensor in hf_state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith(_HF_ATTENTION_BUFFERS):
            continue
        if name.endswith(_CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[name] = tensor
    head = state.pop("lm_head.weight", None)
    wte = state.get("transformer.wte.weight")
    if head is not None and (wte is None or not torch.equal(head, wte)):
        raise CheckpointError(
            f"{source}: lm_head.weight differs from transformer.wte.weight; GPT ties them"
        )
    if wte is not None:
        # GPT's state dict names the tied matrix twice; supplying both keeps the check strict.
        state["lm_head.weight"] = wte
    return state


def gpt_from_hf_gpt2(hf_config: dict, hf_state: dict, source="GPT-2", **loop_overrides) -> GPT:
    """A GPT holding a Hugging Face GPT-2's weights (same logits), optionally looped."""
    _check_loop_overrides(loop_overrides)
    args = gpt_config_args_from_hf(hf_config, source)
    state = gpt_state_dict_from_hf(hf_state, source)
    model = GPT(GPTConfig(**args, **loop_overrides))
    _load_weights(model, state, source)
    return model


def _torch_load_tensors(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True), which refuses anything "
            f"but tensors and plain containers ({type(exc).__name__}: {first_line})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def _safetensors_load(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(
            f"reading {path} needs the safetensors package: pip install safetensors "
            f"(it comes with 'blockloop[online]')"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for bad bytes
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def _read_weight_file(path: Path) -> dict:
    return _safetensors_load(path) if path.suffix == ".safetensors" else _torch_load_tensors(path)


def read_hf_directory(directory: str | Path) -> tuple[dict, dict]:
    """(config dict, state dict) of a Hugging Face model directory, read without `transformers`."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{config_path} is not readable JSON ({exc})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    weights = next((directory / f for f in HF_WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{directory} has no weights: expected one of {', '.join(HF_WEIGHT_FILES)}"
        )
    if weights.name.endswith(".index.json"):
        try:
            weight_map = json.loads(weights.read_text())["weight_map"]
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{weights} is not a shard index ({exc!r})") from None
        shards = sorted(set(weight_map.values()))
        # Shard names come from a file: only plain names inside the directory are followed.
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
        if bad:
            raise CheckpointError(f"{weights} names shards outside {directory}: {bad[:3]}")
        state = {}
        for shard in shards:
            state.update(_read_weight_file(directory / shard))
    else:
        state = _read_weight_file(weights)
    return hf_config, state


def _download_hf_gpt2(name: str) -> tuple[dict, dict]:
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ConfigError(
            f"loading {name!r} from the Hugging Face hub needs transformers: "
            f"pip install 'blockloop[online]' (or pass a local directory saved with "
            f"save_pretrained, which needs neither transformers nor a network)"
        ) from None
    hf_model = GPT2LMHeadModel.from_pretrained(name)
    return hf_model.config.to_dict(), hf_model.state_dict()


def from_pretrained(name_or_dir: str | Path, **loop_overrides) -> GPT:
    """GPT-2 from a Hugging Face name (`GPT2_NAMES`, online) or a local model directory.

    `loop_overrides` are `LOOP_KEYS` (e.g. `loop_center_idx=5, max_loops=2`); the weights are
    the same either way, the looped blocks just run more than once.
    """
    _check_loop_overrides(loop_overrides)
    path = Path(name_or_dir)
    if path.is_dir():
        hf_config, hf_state = read_hf_directory(path)
    elif str(name_or_dir) in GPT2_NAMES:
        hf_config, hf_state = _download_hf_gpt2(str(name_or_dir))
    else:
        raise ConfigError(
            f"{str(name_or_dir)!r} is neither a local Hugging Face model directory nor one of "
            f"{', '.join(GPT2_NAMES)}"
        )
    return gpt_from_hf_gpt2(hf_config, hf_state, source=str(name_or_dir), **loop_overrides)


def load_pretrained(name_or_path: str, **loop_overrides) -> GPT:
    """`init_from` values other than scratch/resume: a nanoGPT checkpoint, or GPT-2.

    A file, or a directory holding `ckpt.pt`, is a nanoGPT checkpoint; a directory holding
    Hugging Face weights (`HF_WEIGHT_FILES`) is a GPT-2 to read from disk; otherwise the value
    must be a GPT-2 name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return from_nanogpt_checkpoint(path, **loop_overrides)
    if path.is_dir() and (path / "ckpt.pt").is_file():
        return from_nanogpt_checkpoint(path / "ckpt.pt", **loop_overrides)
    # A blockloop out_dir also holds a config.json; only a weight file makes a directory HF's.
    if (path.is_dir() and any((path / f).is_file() for f in HF_WEIGHT_FILES)) or (
        name_or_path in GPT2_NAMES
    ):
        return from_pretrained(name_or_path, **loop_overrides)
    raise ConfigError(
        f"init_from={name_or_path!r}: use 'scratch', 'resume', one of {', '.join(GPT2_NAMES)}, "
        f"the path of a nanoGPT checkpoint (or a directory holding ckpt.pt), or a Hugging Face "
        f"GPT-2 directory (config.json and model.safetensors or pytorch_model.bin)"
    )


# nanoGPT's API: `GPT.from_pretrained("gpt2")`. It is attached here rather than defined in
# model.py so that the model module imports nothing of the package but the loop (no circle);
# `blockloop/__init__.py` imports this module, so the method is there whenever GPT is.
GPT.from_pretrained = staticmethod(from_pretrained)

__all__ = [
    "GPT2_NAMES",
    "from_nanogpt_checkpoint",
    "from_pretrained",
    "gpt_config_args_from_hf",
    "gpt_from_hf_gpt2",
    "gpt_state_dict_from_hf",
    "load_pretrained",
    "read_hf_directory",
]
