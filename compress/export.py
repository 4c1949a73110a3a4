"""``compress export``: a compress checkpoint rewritten in a layout serving engines read (GPTQ, compressed-tensors),
written atomically as every checkpoint is; the tokenizer, generation config and recipe come along."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors.torch import save_file

from compress.checkpoint import load, recover_leftovers, writing
from compress.checkpoint_files import SAFETENSORS_FILE, SAFETENSORS_INDEX, read_quantization_config
from compress.errors import UsageError

log = logging.getLogger(__name__)

LAYOUTS = ("gptq", "compressed-tensors")
KEPT_ASIDE = ("config.json", SAFETENSORS_FILE, SAFETENSORS_INDEX, "README.md")  # rewritten, or not this layout's


def export(source: str | Path, layout: str, output: str | Path, overwrite: bool = False) -> Path:
    """Write the compress checkpoint ``source`` to ``output`` in ``layout``; the output folder. CheckpointError
    naming each layer the layout cannot express (then nothing is written)."""
    from compress.layouts import compressed_tensors, gptq

    if layout not in LAYOUTS:
        raise UsageError(f"--format {layout!r}: compress exports {', '.join(LAYOUTS)}")
    source, target = Path(source).expanduser().resolve(), Path(output).expanduser().resolve()
    recover_leftovers(target)
    if target.exists() and not overwrite:  # before the model is read
        raise UsageError(f"output {target} already exists; pass --overwrite to replace it, or choose another output")
    if read_quantization_config(source) is None:
        raise UsageError(f"{source} is not a compress checkpoint (no quantization_config of quant_method compress)")
    model = load(source, device="cpu", enable_runtime=False)
    writer = gptq if layout == "gptq" else compressed_tensors
    tensors, quantization_config = writer.export_model(model)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    with writing(target, overwrite) as folder:
        save_file(tensors, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        for file in source.iterdir():
            if file.is_file() and file.name not in KEPT_ASIDE and not file.name.startswith(".") \
                    and not file.name.endswith(".safetensors"):
                shutil.copy2(file, folder / file.name)
    log.info("exported %s as %s to %s", source, layout, target)
    return target
