"""dsv3c: DeepSeek-V2/V3 for torch.compile, AOT artifacts and low-latency generation.

`dsv3.load(checkpoint_dir, ...)` returns a `Transformer` with its weights loaded; `model(tokens, input_pos)` gives
logits. `dsv3.ModelConfig` / `dsv3.resolve_config` read configs.
"""

from dsv3.config import ConfigError, ModelConfig, resolve_config
from dsv3.model import Transformer

__all__ = ["ConfigError", "ModelConfig", "Transformer", "load", "resolve_config"]
__version__ = "0.1.0"


def load(checkpoint_dir, **kwargs) -> Transformer:
    """Build the model for a Hugging Face-layout checkpoint and load its weights (see dsv3.checkpoint.load)."""
    from dsv3.checkpoint import load as _load

    return _load(checkpoint_dir, **kwargs)
