"""blockloop: looped transformers in the spirit of nanoGPT.

Importing the package also attaches nanoGPT's `GPT.from_pretrained` (see blockloop.pretrained).
"""

from blockloop.model import GPT, GPTConfig
from blockloop.pretrained import from_pretrained

__all__ = ["GPT", "GPTConfig", "from_pretrained"]
__version__ = "0.1.0"
