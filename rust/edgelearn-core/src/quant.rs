//! Symmetric INT8 quantization (placeholder; filled in by the quantization work).
