"""tvc-rs: the fast core of TVC (Take-along Visual Conditioning).

Reflection-trigger detection, PVC scheduling, M-RoPE positions, visual-token compression and
KV-cache re-injection for Qwen2-VL-family reasoning models, in Rust with thin Python bindings.
"""

from tvc_rs._native import __version__

# One import line per capability module; each module defines its own __all__.
from tvc_rs.triggers import *  # noqa: F401,F403
from tvc_rs.pvc import *  # noqa: F401,F403
from tvc_rs.rope import *  # noqa: F401,F403
from tvc_rs.compress import *  # noqa: F401,F403
from tvc_rs.kv import *  # noqa: F401,F403
from tvc_rs.dvr import *  # noqa: F401,F403

from tvc_rs import _cuda_paths  # noqa: F401 (where PyPI's NVRTC is, for the CUDA backend)
from tvc_rs import compress, dvr, kv, pvc, rope, triggers
from tvc_rs import hf  # transformers driver; imports torch / transformers only when used

__all__ = ["__version__", *triggers.__all__, *pvc.__all__, *rope.__all__, *compress.__all__, *kv.__all__, *dvr.__all__]
