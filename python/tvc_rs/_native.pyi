"""Type stubs of the native module ``tvc_rs._native`` (Rust, PyO3). One section per capability."""

from __future__ import annotations

__version__: str

# --- triggers (src/python/triggers.rs) ---

# --- end triggers ---

# --- rope (src/python/rope.rs) ---

# --- end rope ---

# --- compress (src/python/compress.rs) ---

# --- end compress ---

# --- kv (src/python/kv.rs) ---

# --- end kv ---
