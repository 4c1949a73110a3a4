"""GPTQ quantization time, compress against llm-compressor, on a random-weight model of a real shape, in one
run (GPU; llm-compressor from ../shared/device/make-devdeps.sh --peers on PYTHONPATH)::

    python -m benchmarks.peer_bench --shape llama-3.2-1b --samples 128 --seq-len 1024

Both quantize the same model (fresh copies from one seed) with the same calibration tokens: 4-bit,
group 128, symmetric, every Linear but lm_head. Times are wall-clock seconds of the quantization call
(calibration passes included), with CUDA synchronised, after one warm-up run of each on a small model
so one-time costs (imports, kernel compilation) are not counted.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import compress

from benchmarks.bench import random_model


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def ours(model, ids: torch.Tensor, args: dict) -> None:
    compress.apply(model, [{"method": "gptq", "args": args}], calib=ids, device="cuda")


def llm_compressor(model, ids: torch.Tensor, processor) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model.config._name_or_path = processor.name_or_path  # it looks the model up by name; a random one has none
    oneshot(model=model, dataset=data, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            processor=processor, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--config", action="append", default=[], help="our GPTQ args as JSON (repeatable)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--tokenizer", help="a tokenizer directory for llm-compressor, which insists on one (the "
                                            "calibration data is already token ids, so any tokenizer will do)")
    parser.add_argument("--json")
    args = parser.parse_args()
    configs = [json.loads(c) for c in args.config] or [{"bits": 4, "group_size": 128}]
    ids = torch.randint(0, 128256, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    small = ids[:4, :128]
    rows = []
    processor = None
    if not args.no_peer:
        from transformers import AutoTokenizer

        processor = AutoTokenizer.from_pretrained(args.tokenizer)
    warm = random_model(args.shape, "cuda", torch.bfloat16)
    ours(warm, small, configs[0])
    del warm
    for config in configs:
        model = random_model(args.shape, "cuda", torch.bfloat16)
        seconds = _timed(lambda: ours(model, ids, config))
        rows.append({"tool": "compress", "config": config, "seconds": seconds})
        print(f"compress gptq {json.dumps(config)}: {seconds:.1f} s", flush=True)
        del model
        torch.cuda.empty_cache()
    if not args.no_peer:
        llm_compressor(random_model(args.shape, "cuda", torch.bfloat16), small, processor)
        model = random_model(args.shape, "cuda", torch.bfloat16)
        seconds = _timed(lambda: llm_compressor(model, ids, processor))
        rows.append({"tool": "llm-compressor", "config": "GPTQModifier W4A16", "seconds": seconds})
        print(f"llm-compressor gptq W4A16: {seconds:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "samples": args.samples, "seq_len": args.seq_len, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
