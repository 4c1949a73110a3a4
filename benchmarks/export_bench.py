"""Exports measured (issue 24): each recipe is applied to a model and saved, the checkpoint exported to
compressed-tensors (and to GPTQ where that layout takes it); the compressed-tensors export is loaded by transformers
with the compressed-tensors package in a process that never imports compress, the GPTQ one by ``compress.load``
(which converts it); perplexities on the same windows, against the compress checkpoint's::

    python -m benchmarks.export_bench --model ref-a --calib calib.txt --valid valid.txt \\
        --recipes w4-gptq,w4-awq,int8-absmax,fp8,fp8-weight-only --max-tokens 102400

Perplexity: the text tokenized once, non-overlapping windows of --seq-len, the remainder dropped, exp(mean NLL) (the
README's protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def window_perplexity(model, ids: torch.Tensor, seq_len: int, batch: int = 4) -> float:
    """exp(mean NLL) of ``model`` over the non-overlapping ``seq_len`` windows of ``ids`` (remainder dropped)."""
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            x = windows[start:start + batch]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def _child(path: str, ids_file: str, seq_len: int) -> None:
    """Load ``path`` with transformers and the compressed-tensors package alone (their default path, which runs FP8
    activations quantized; ``dequantize=True`` where that fails, as for asymmetric pack-quantized checkpoints with
    compressed-tensors 0.20.1); print its perplexity and the path as JSON."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    try:
        model, route = AutoModelForCausalLM.from_pretrained(path), "default"
    except (RuntimeError, ValueError):
        config = CompressedTensorsConfig(dequantize=True)
        model, route = AutoModelForCausalLM.from_pretrained(path, quantization_config=config), "dequantize=True"
    ppl = window_perplexity(model.eval(), torch.load(ids_file), seq_len)
    print(json.dumps({"ppl": ppl, "route": route, "compress_imported": "compress" in sys.modules}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--recipes", default="w4-gptq,w4-awq,int8-absmax,fp8,fp8-weight-only")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args(argv)

    import compress
    from compress.calibration.data import calibration_set
    from compress.checkpoint import save
    from compress.errors import CheckpointError
    from compress.export import export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tok(open(args.valid).read(), verbose=False)["input_ids"])
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    calib = calibration_set(tok, args.calib, 128, 1024, seed=0)
    work = Path(args.work or tempfile.mkdtemp(prefix="export-bench-"))
    ids_file = work / "ids.pt"
    work.mkdir(parents=True, exist_ok=True)
    torch.save(ids, ids_file)
    rows = []
    for name in args.recipes.split(","):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        compress.apply(model, f"recipes/{name}.yaml", calib=calib, tokenizer=tok, device="cpu")
        save(model, work / name, tokenizer=tok, overwrite=True)
        base = window_perplexity(compress.load(work / name, device="cpu"), ids, args.seq_len)
        row = {"recipe": name, "compress": base}
        start = time.perf_counter()
        ct = export(work / name, "compressed-tensors", work / f"{name}-ct", overwrite=True)
        done = subprocess.run([sys.executable, "-m", "benchmarks.export_bench", "--child", str(ct), str(ids_file),
                               str(args.seq_len)], capture_output=True, text=True)
        if done.returncode:
            row["compressed-tensors"] = "load failed: " + done.stderr.strip().splitlines()[-1]
        else:
            child = json.loads(done.stdout.strip().splitlines()[-1])
            row["compressed-tensors"] = child["ppl"]
            row["transformers route"] = child["route"]
            row["compress imported by the loader"] = child["compress_imported"]
        try:
            gptq = export(work / name, "gptq", work / f"{name}-gptq", overwrite=True)
            row["gptq (compress.load)"] = window_perplexity(compress.load(gptq, device="cpu"), ids, args.seq_len)
        except CheckpointError as exc:
            row["gptq (compress.load)"] = f"refused: {str(exc)[:120]}"
        row["export seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("| recipe | compress checkpoint | compressed-tensors (transformers) | difference | route | GPTQ (compress.load) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ct = r["compressed-tensors"]
        diff = f"{ct / r['compress'] - 1:+.4%}" if isinstance(ct, float) else "–"
        g = r["gptq (compress.load)"]
        cells = [ct if isinstance(ct, str) else f"{ct:.4f}", g if isinstance(g, str) else f"{g:.4f}"]
        print(f"| {r['recipe']} | {r['compress']:.4f} | {cells[0]} | {diff} | {r.get('transformers route', '–')} | "
              f"{cells[1]} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
