"""Compression benchmark: quality (perplexity against the original on the same text) and compression time
of several method configurations or recipes (training stages included) on one model, in one run.

    python -m benchmarks.quantize_bench --model DIR --calib calib.txt --valid valid.txt \\
        --config '{"method": "gptq", "args": {"bits": 4}}' --config '{"method": "awq", "args": {"bits": 4}}' \\
        --config '{"model": {"compute_dtype": "float32"}, "steps": [{"method": "awq", "args": {"bits": 4}}]}'

Each configuration starts from a fresh copy of the model. Times are wall-clock seconds of
``compress.apply`` (calibration forward passes included, data tokenisation excluded), with CUDA
synchronised. Perplexity follows the ANCHORS.md protocol: the whole text tokenised once, non-overlapping
windows of --seq-len, exp(mean NLL).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import compress
from compress.calibration.data import calibration_set
from compress.eval.perplexity import Protocol, perplexity
from compress.model import DTYPES


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="calibration text file")
    parser.add_argument("--valid", required=True, help="evaluation text file")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=1024)
    parser.add_argument("--calib-seed", type=int, default=0,
                        help="seed of the calibration sample (another seed shows how much a result owes to the draw)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-device", default=None, help="where the model sits while compressed (default: --device)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    parser.add_argument("--config", action="append", default=[],
                        help="a step, a list of steps, or a recipe with a steps or stages key, as JSON (repeatable); "
                        "a training stage reads its training.dataset, else trains on the calibration sample")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tok(open(args.valid).read(), verbose=False)["input_ids"])
    calib = calibration_set(tok, args.calib, args.samples, args.calib_len, seed=args.calib_seed)
    protocol = Protocol(seq_len=args.seq_len, max_tokens=args.max_tokens, text=args.valid)
    load_device = args.load_device or args.device

    def fresh():
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(load_device).eval()

    def ppl(model) -> float:
        return perplexity(model.to(args.device), ids, protocol, device=args.device, progress=False).perplexity

    base = ppl(fresh())
    rows = [{"config": "original", "ppl": base, "delta": 0.0, "seconds": 0.0}]
    print(f"{'original':<70} ppl {base:.4f}", flush=True)
    for text in args.config:
        step = json.loads(text)
        model = fresh()
        _sync()
        start = time.perf_counter()
        recipe = step if isinstance(step, list) or "steps" in step or "stages" in step else [step]
        compress.apply(model, recipe, calib=calib, tokenizer=tok, device=args.device)
        _sync()
        seconds = time.perf_counter() - start
        value = ppl(model)
        rows.append({"config": step, "ppl": value, "delta": value / base - 1, "seconds": seconds})
        print(f"{json.dumps(step):<70} ppl {value:.4f} ({value / base - 1:+.2%})  {seconds:6.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"protocol": protocol.to_dict(), "samples": args.samples, "calib_len": args.calib_len,
                       "calib_seed": args.calib_seed,
                       "dtype": args.dtype, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu", "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
