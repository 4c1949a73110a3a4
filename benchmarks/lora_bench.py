"""Fine-tuning benchmark: LoRA on the bf16 model, QLoRA on its NF4 rounding, and LoRA on a w4-gptq compress
checkpoint, with the same steps, rate and rank, on a new domain; then each output path against the trained model.

    python -m benchmarks.lora_bench --model ref-a-dir --text wiki.test.raw --calib calib.txt --steps 100

--text is cut in two at the first line break after 80% of its characters: the first part is the training text,
the second the evaluation text (perplexity in non-overlapping --seq-len windows, as quantize_bench measures it).
Rows: the untuned model; for each base, the trained model (its adapter loaded with peft onto the base it was
trained on: the NF4 base as transformers loads it with BitsAndBytesConfig, or the w4-gptq checkpoint) and the
checkpoint ``compress apply`` wrote (merged into bf16 for NF4 and bf16; beside the stored layers for w4-gptq),
then the merged NF4 model quantized again with GPTQ 4-bit, a path (2) with re-quantization. Everything runs
through compress.apply and compress.save as the CLI does, in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress.calibration.data import calibration_set
from compress.eval.perplexity import Protocol, perplexity
from compress.lora import ADAPTER_DIR, load_adapter
from compress.model import DTYPES

GPTQ = {"method": "gptq", "args": {"bits": 4, "group_size": 128, "symmetric": True, "act_order": True, "mse": True,
                                   "fit_original": True}}


def split(text_file: Path, folder: Path) -> tuple[Path, Path]:
    """The first 80% of ``text_file``'s characters (cut at a line break) and the rest, as two files."""
    text = text_file.read_text(encoding="utf-8")
    cut = text.index("\n", int(len(text) * 0.8)) + 1
    (folder / "train.txt").write_text(text[:cut], encoding="utf-8")
    (folder / "eval.txt").write_text(text[cut:], encoding="utf-8")
    return folder / "train.txt", folder / "eval.txt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True, help="the new domain's text, split 80/20 into training/evaluation")
    parser.add_argument("--calib", required=True, help="GPTQ's calibration text (the model's own domain)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--bases", default="bf16,nf4,w4-gptq", help="comma-separated: bf16, nf4, w4-gptq")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    train_text, eval_text = split(Path(args.text), work)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tok(eval_text.read_text(encoding="utf-8"), verbose=False)["input_ids"])
    protocol = Protocol(seq_len=args.seq_len, text=str(eval_text))
    dtype = DTYPES[args.dtype]
    training = {"dataset": str(train_text), "steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "lr": args.lr, "save_every": args.steps}
    rows: list[dict] = []

    def ppl(model) -> float:
        return perplexity(model.to(args.device), ids, protocol, device=args.device, progress=False).perplexity

    def report(name: str, value: float, seconds: float = 0.0, **extra) -> None:
        rows.append({"row": name, "ppl": value, "seconds": seconds, **extra})
        print(f"{name:<58} ppl {value:9.4f}  {seconds:7.1f} s", flush=True)

    def fresh(path=args.model):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    def tune(base_model, step_args: dict, out: str) -> Path:
        recipe = {"training": training, "steps": [{"method": "qlora", "args": {"r": args.r, "alpha": args.alpha,
                                                                               **step_args}}]}
        start = time.perf_counter()
        tuned = compress.apply(base_model, recipe, tokenizer=tok, device=args.device)
        seconds = time.perf_counter() - start
        compress.save(tuned, work / out, tok)
        report(f"{out}: checkpoint", ppl(compress.load(work / out, device=args.device)), seconds)
        return work / out

    report("untuned (bf16)", ppl(fresh()))
    for base in args.bases.split(","):
        if base == "bf16":
            out = tune(fresh(), {"base": "keep"}, "lora-bf16")
            report("lora-bf16: adapter on the bf16 base", ppl(load_adapter(fresh(), out / ADAPTER_DIR)))
        elif base == "nf4":
            out = tune(fresh(), {"base": "nf4"}, "qlora-nf4")
            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
            on_base = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=nf4,
                                                           device_map=args.device, dtype=dtype)
            report("qlora-nf4: adapter on the NF4 base (the trained model)",
                   ppl(load_adapter(on_base.eval(), out / ADAPTER_DIR)))
            merged = compress.load(out, device=args.device)
            calib = calibration_set(tok, args.calib, 128, args.seq_len)
            start = time.perf_counter()
            compress.apply(merged, [GPTQ], calib=calib, device=args.device)
            report("qlora-nf4: merged, then GPTQ 4-bit g128", ppl(merged), time.perf_counter() - start)
        elif base == "w4-gptq":
            calib = calibration_set(tok, args.calib, 128, args.seq_len)
            quantized = compress.apply(fresh(), [GPTQ], calib=calib, device=args.device)
            compress.save(quantized, work / "w4-gptq", tok)
            report("w4-gptq (untuned)", ppl(compress.load(work / "w4-gptq", device=args.device)))
            out = tune(compress.load(work / "w4-gptq", device=args.device), {"base": "keep", "save": "beside"},
                       "lora-w4-gptq")
            on_base = compress.load(work / "w4-gptq", device=args.device)
            report("lora-w4-gptq: adapter on the w4-gptq checkpoint (the trained model)",
                   ppl(load_adapter(on_base, out / ADAPTER_DIR)))
        else:
            raise SystemExit(f"unknown base {base!r}: use bf16, nf4, w4-gptq")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {device}; training: {json.dumps(training)}; r {args.r}, alpha {args.alpha}; {work}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "training": training, "r": args.r, "alpha": args.alpha, "rows": rows}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
