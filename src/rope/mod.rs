//! M-RoPE position ids (Qwen2-VL / Qwen2.5-VL) and image token counts.
