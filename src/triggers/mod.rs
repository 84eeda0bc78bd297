//! Reflection-trigger detection on decoded bytes.
