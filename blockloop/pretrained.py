"""Starting from trained weights: nanoGPT checkpoints and (online) Hugging Face GPT-2.

Weights load into the one `GPT` class; looping keys (`LOOP_KEYS`) may then be switched on, so
that the middle blocks of a trained model can be looped and fine-tuned. Every file goes through
`blockloop.checkpoint`'s safe loader (`weights_only=True`): no code runs from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from blockloop.checkpoint import read_nanogpt_checkpoint
from blockloop.model import GPT, LOOP_KEYS, GPTConfig


def _check_loop_overrides(overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(LOOP_KEYS))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: only looping keys can change when loading trained weights "
            f"(allowed: {', '.join(LOOP_KEYS)})"
        )


def from_nanogpt_checkpoint(path: str | Path, map_location="cpu", **loop_overrides) -> GPT:
    """A GPT with the weights of nanoGPT's `ckpt.pt` (same logits), optionally looped."""
    _check_loop_overrides(loop_overrides)
    model_args, state_dict, _ = read_nanogpt_checkpoint(path, map_location=map_location)
    config = GPTConfig(**model_args, **loop_overrides)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Adapters of a newly switched-on concat loop are the only weights a nanoGPT file lacks.
    missing = [k for k in missing if not k.startswith("looper.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: state dict does not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return model


def load_pretrained(name_or_path: str, **loop_overrides) -> GPT:
    """`init_from` values other than scratch/resume: a nanoGPT `ckpt.pt` path, or GPT-2."""
    path = Path(name_or_path)
    if path.is_file():
        return from_nanogpt_checkpoint(path, **loop_overrides)
    if path.is_dir() and (path / "ckpt.pt").is_file():
        return from_nanogpt_checkpoint(path / "ckpt.pt", **loop_overrides)
    raise ValueError(
        f"init_from={name_or_path!r}: not a file or a directory with ckpt.pt; use 'scratch', "
        f"'resume' or the path of a nanoGPT checkpoint"
    )


__all__ = ["from_nanogpt_checkpoint", "load_pretrained"]
