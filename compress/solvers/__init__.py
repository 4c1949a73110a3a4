"""Solvers that several compression families share: the second moments of a layer's inputs (the Hessian of
its output error), damping that retries, the optimal-brain-surgeon column sweep with lazy block updates
(GPTQ rounds in it; SparseGPT prunes in it), and the truncated SVD, plain or whitened by those second moments,
with ranks allocated across layers (low rank; the low-rank correction of quantized layers will use it too)."""
