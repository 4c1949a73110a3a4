"""Developer benchmarks: scripts that measure the toolkit (kernels, formats, quantization, peers). They live in
the checkout, not in the installed package; run them from the repository root (GPU unless noted; ``--help`` each):

    python -m benchmarks.bench --random llama-3.2-1b      # generation speed and memory, random-weight real shape
    python -m benchmarks.format_bench --shape llama-3-8b  # decode, prefill, peak memory per format vs bf16, bnb
    python -m benchmarks.kernel_bench --tokens 1,8        # time and bandwidth per linear kernel, Llama-3-8B shapes
    python -m benchmarks.peer_bench --shape llama-3.2-1b  # GPTQ quantization time, compress vs llm-compressor
    python -m benchmarks.quantize_bench --model DIR ...   # perplexity and time of method configs (CPU or GPU)
    python -m benchmarks.step_profile --shape llama-3-8b  # a compiled decode step's GPU time, kernel by kernel

For a real model's quality, memory and speed, use ``compress eval``. Figures they gave: README.md, docs/.
"""
