"""blockloop: looped transformers in the spirit of nanoGPT."""

from blockloop.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
