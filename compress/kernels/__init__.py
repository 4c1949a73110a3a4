"""Fast paths for compressed layers on GPUs: each module holds the layout conversion a kernel needs and the
call, and says when it applies; the layers fall back to dequantize-then-matmul elsewhere."""
