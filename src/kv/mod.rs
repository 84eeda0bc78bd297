//! KV-cache re-injection: key re-rotation (RoPE, M-RoPE), span relocation, paged gather-rotate-scatter.
