"""Custom ops behind the model's hot paths, registered under `torch.ops.dsv3`.

Each op lives in one file with its plain-PyTorch reference, its fake (shape) implementation and its device
implementation side by side. Importing this package registers them all.
"""

from dsv3.kernels import fp8_linear, mla_absorb, mla_attention, mla_prefill, routed_experts  # noqa: F401  (registers the ops)
from dsv3.kernels import router  # noqa: F401  (registers torch.ops.dsv3.route)
from dsv3.kernels import rms_norm  # noqa: F401  (registers torch.ops.dsv3.add_rms_norm_quant)
from dsv3.kernels import mla_decode_prep  # noqa: F401  (registers dsv3.mla_decode_prep and dsv3.mla_prefill_prep)
from dsv3.kernels import mla_attention_out  # noqa: F401  (registers torch.ops.dsv3.mla_attention_out)
from dsv3.kernels import norm_route  # noqa: F401  (registers torch.ops.dsv3.add_rms_norm_quant_route)
from dsv3.kernels import fp8_swiglu  # noqa: F401  (registers torch.ops.dsv3.fp8_swiglu)
from dsv3.kernels import greedy  # noqa: F401  (registers torch.ops.dsv3.greedy_next_)
from dsv3.kernels import top_p  # noqa: F401  (registers torch.ops.dsv3.top_p_scores)
from dsv3.kernels import moe_residual_norm  # noqa: F401  (registers torch.ops.dsv3.moe_residual_norm_quant)
from dsv3.kernels.cache_key import install as _install_cache_key

_install_cache_key()
