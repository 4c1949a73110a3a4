"""Solvers that several compression families share: the second moments of a layer's inputs (the Hessian of
its output error), damping that retries, and the optimal-brain-surgeon column sweep with lazy block updates
(GPTQ rounds in it; SparseGPT prunes in it)."""
