"""Reports: the JSON of one run, and the comparison document (Markdown and one self-contained HTML file) of
one or several runs.

A run's JSON has at its top level ``perplexity`` (the evaluated model's, or null), ``protocol`` (how it
was measured), ``baseline`` (``{"ref", "label", "perplexity"}`` or null), ``environment`` (device, GPU,
versions), ``models`` (what was evaluated) and one section per task (``ppl``, ``kl``, ``samples``,
``memory``, ``speed``, ``speculative``) holding per-model results under ``model`` / ``baseline``.

Several runs (e.g. several recipes on one model) merge into one comparison: each model is one entry (a
baseline shared by runs appears once). Perplexities are comparable only under the same protocol (window,
stride, BOS, token cap, text and its digest): entries are grouped by protocol, one table each, never mixed.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import UsageError
from compress.eval import plots
from compress.eval.render import Heading, Paragraph, Plot, Table, to_html, to_markdown

SCHEMA = "compress.eval/1"
MB = 2**20


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def load_reports(paths: list[str | Path]) -> list[dict]:
    """Read run reports written by ``compress eval --json``; UsageError names a file that is not one."""
    reports = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise UsageError(f"report not found: {path}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read report {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise UsageError(f"{path} is not a compress eval report (no \"schema\": \"{SCHEMA}\"); write one with "
                             "compress eval MODEL --json FILE")
        reports.append(data)
    return reports


# -- entries: one per model ------------------------------------------------------------------------------


def protocol_key(protocol: dict | None) -> str:
    return json.dumps(protocol, sort_keys=True)


def _entry(report: dict, role: str) -> dict:
    info = report["models"][role]
    ppl = (report.get("ppl") or {}).get(role)
    memory = (report.get("memory") or {}).get(role)
    speed = report.get("speed") or {}
    entry = {
        "label": info["label"], "ref": info["ref"], "role": role, "dtype": info.get("dtype"),
        "perplexity": ppl["perplexity"] if ppl else None, "protocol": report.get("protocol"),
        "memory": memory, "speed": (speed.get("rows") or {}).get(role, []),
        "mixed": (speed.get("mixed") or {}).get(role, []),
        "size_bytes": memory and (memory.get("checkpoint_bytes") or memory.get("tensor_bytes")),
        "device": report["environment"].get("gpu") or report["environment"].get("device"),
    }
    if role == "model":
        entry["delta"] = (report.get("ppl") or {}).get("delta")
        entry["kl"] = report.get("kl")
        entry["agreement"] = (report.get("samples") or {}).get("agreement")
    return entry


def entries(reports: list[dict]) -> list[dict]:
    """Each run's model, then its baseline unless an earlier run had the same one (same model, dtype,
    device and protocol)."""
    out, seen = [], set()
    for report in reports:
        for role in ("model", "baseline"):
            if role not in report.get("models", {}):
                continue
            entry = _entry(report, role)
            key = (entry["ref"], entry["dtype"], entry["device"], protocol_key(entry["protocol"]), role)
            if role == "baseline" and key in seen:
                continue
            seen.add(key)
            out.append(entry)
    return out


def protocol_groups(items: list[dict]) -> list[tuple[str, list[dict]]]:
    """Entries with a perplexity, grouped by protocol: (the protocol in words, its entries)."""
    groups: dict[str, list[dict]] = {}
    for e in items:
        if e["perplexity"] is not None:
            groups.setdefault(protocol_key(e["protocol"]), []).append(e)
    return [(describe_protocol(group[0]["protocol"]), group) for group in groups.values()]


def describe_protocol(protocol: dict) -> str:
    from compress.eval.perplexity import Protocol

    text = Protocol(**protocol).describe()
    return text + (f" (text sha256 {protocol['text_sha256'][:12]})" if protocol.get("text_sha256") else "")


# -- the document ---------------------------------------------------------------------------------------


def _f(value, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def _mib(value) -> str:
    return "–" if value is None else f"{value / MB:,.1f}"


def _quality(items: list[dict]) -> list:
    groups = protocol_groups(items)
    if not groups:
        return []
    blocks: list = [Heading("Quality")]
    if len(groups) > 1:
        blocks.append(Paragraph(f"{len(groups)} perplexity protocols: one table each (numbers measured under "
                                "different protocols are not comparable)."))
    for caption, group in groups:
        blocks.append(Paragraph(f"Protocol: {caption}"))
        rows = []
        for e in group:
            kl, agreement = e.get("kl") or {}, e.get("agreement") or {}
            rows.append([e["label"], e["dtype"] or "–", _mib(e["size_bytes"]), _f(e["perplexity"]),
                         _f(e.get("delta"), "+.2%"), _f(kl.get("mean_kl"), ".5f"), _f(kl.get("top1_agreement"), ".2%"),
                         _f(agreement.get("identical_token_share"), ".2%")])
        blocks.append(Table(["model", "dtype", "size MiB", "perplexity", "Δ vs baseline", "mean KL (nats)",
                             "top-1 agreement", "greedy tokens identical"], rows))
    blocks.append(Plot("perplexity_vs_size", "Perplexity vs size", plots.perplexity_vs_size(groups)))
    return blocks


def _memory(items: list[dict]) -> list:
    rows = []
    for e in items:
        m = e["memory"]
        if m:
            by_dtype = ", ".join(f"{k} {_mib(v)}" for k, v in m["tensor_bytes_by_dtype"].items())
            rows.append([e["label"], _mib(m["checkpoint_bytes"]), _mib(m["tensor_bytes"]), by_dtype,
                         f"{m['kv_cache_bytes_per_token']:,}",
                         f"{_mib(m['kv_cache_bytes_at_context'])} at {m['context']}",
                         _mib(m["peak_generation_bytes"])])
    if not rows:
        return []
    layouts = [[e["label"], name, str(row["layers"]), f"{row['sparsity']:.0%}", _mib(row["stored_bytes"]),
                f"{row['stored_bytes'] / row['dense_bytes']:.3f}x" if row["dense_bytes"] else "–"]
               for e in items if e["memory"] for name, row in (e["memory"].get("layouts") or {}).items()]
    return [Heading("Memory"),
            Table(["model", "checkpoint MiB", "in memory MiB", "by dtype (MiB)", "KV bytes/token", "KV MiB at context",
                   "peak generation MiB"], rows),
            Table(["model", "linear layers stored as", "layers", "pruned", "stored MiB", "vs dense"], layouts),
            Plot("memory", "Memory", plots.memory(items))]


def _speed(items: list[dict], reports: list[dict]) -> list:
    rows = [[e["label"], r["config"], str(r["batch"]), str(r["new_tokens"]),
             r.get("skipped") or _f(r.get("prefill_tok_s"), ",.0f"), _f(r.get("decode_tok_s"), ",.1f"),
             _f(r.get("ms_per_step"), ".2f"), _mib(r.get("peak_gpu_bytes"))]
            for e in items for r in e["speed"]]
    mixed = [[e["label"], r["mode"], str(r["batch_size"] or "–"), str(r["tokens"]), _f(r["seconds"], ".2f"),
              _f(r["tok_s"], ",.1f")] for e in items for r in e["mixed"]]
    if not rows and not mixed:
        return []
    settings = next(r["speed"]["settings"] for r in reports if r.get("speed"))
    blocks: list = [Heading("Speed"), Paragraph(
        f"transformers generate, greedy, prompt {settings['prompt_len']} tokens; warm-up {settings['warmup']}, "
        f"median of {settings['repeats']} runs. Decode tok/s counts every sequence of the batch.")]
    if rows:
        blocks += [Table(["model", "configuration", "batch", "new tokens", "prefill tok/s", "decode tok/s", "ms/step",
                          "peak GPU MiB"], rows), Plot("decode_speed", "Decode speed", plots.decode_speed(items))]
    if mixed:
        blocks += [Paragraph(f"Mixed requests ({settings['mixed_requests']}: prompts of 8 to "
                             f"{2 * settings['prompt_len']} tokens, outputs of {min(8, settings['new_tokens'])} to "
                             f"{settings['new_tokens']})."),
                   Table(["model", "mode", "batch", "tokens", "seconds", "tok/s"], mixed)]
    return blocks


def _per_run(report: dict) -> list:
    label = report["models"]["model"]["label"]
    blocks: list = []
    for target in (report.get("speculative") or {}).get("targets", []):
        blocks += [Heading(f"Speculative decoding: {target['label']} as the target", 3), Paragraph(
            f"Batch 1, greedy, {target['max_new_tokens']} new tokens on {target['prompts']} prompts cut from the "
            f"evaluation text; plain greedy took {target['greedy_seconds']:.2f} s.")]
        blocks.append(Table(["method", "identical to greedy", "acceptance", "tokens/forward", "seconds", "speedup"], [
            [r["method"], "yes" if r["identical"] else "NO: " + ", ".join(
                f"prompt {m['prompt']} from new token {m['new_token']}" for m in r["mismatches"]),
             _f(r.get("acceptance_rate"), ".1%"), _f(r.get("tokens_per_forward"), ".2f"), _f(r["seconds"], ".2f"),
             _f(r["speedup"], ".2f") + "x"] for r in target["rows"]]))
    samples = report.get("samples")
    if samples:
        names = {"model": label, "baseline": (report.get("baseline") or {}).get("label")}
        roles = [k for k in ("baseline", "model") if f"{k}_greedy" in samples["prompts"][0]]
        for kind in ("greedy", "sampled"):
            blocks += [Heading(f"{kind.capitalize()} continuations: {label}", 3),
                       Table(["prompt"] + [names[k] for k in roles],
                             [[row["prompt"]] + [row[f"{k}_{kind}"] for k in roles] for row in samples["prompts"]])]
        agreement = samples.get("agreement")
        if agreement:
            blocks.append(Paragraph(
                f"Greedy tokens identical to the baseline's: {agreement['identical_token_share']:.1%}; "
                f"first divergence after {agreement['mean_first_divergence']:.1f} tokens on average."))
    return blocks


def document(reports: list[dict]) -> list:
    """The blocks of the comparison of ``reports`` (one run or several)."""
    items = entries(reports)
    title = (f"compress eval: {items[0]['label']}" if len(reports) == 1 else f"compress report: {len(reports)} runs")
    blocks: list = [Heading(title, 1)] + _results(reports, items)
    for report in reports:
        blocks += _per_run(report)
    return blocks


def _results(reports: list[dict], items: list[dict]) -> list:
    envs = {json.dumps(r["environment"], sort_keys=True): r["environment"] for r in reports}
    blocks: list = [Paragraph("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
                    for env in envs.values()]
    return blocks + _quality(items) + _memory(items) + _speed(items, reports)


def results_markdown(reports: list[dict], level: int = 2) -> str:
    """The quality, memory and speed tables of ``reports`` with the environment each was measured in, as Markdown
    without plots or generated samples (what a model card shows); its sections' headings are of ``level``."""
    blocks = [b for b in _results(reports, entries(reports)) if not isinstance(b, Plot)]
    return to_markdown([Heading(b.text, b.level + level - 2) if isinstance(b, Heading) else b for b in blocks])


def write_document(reports: list[dict], output: str | Path) -> list[Path]:
    """Write report.md (with its plots as PNG files beside it) and a self-contained report.html; every path
    written, the plots' included."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    blocks = document(reports)
    written = []
    for block in _plots(blocks):
        written.append(output / f"{block.name}.png")
        written[-1].write_bytes(block.png)
    for name, text in (("report.md", to_markdown(blocks)), ("report.html", to_html(blocks))):
        written.append(output / name)
        written[-1].write_text(text)
    return written


def printable(reports: list[dict]) -> tuple[str, list[str]]:
    """The comparison as Markdown to print where no file is written: without its plots (Markdown links them as
    PNG files beside it), and the titles of the plots left out."""
    blocks = document(reports)
    return to_markdown([b for b in blocks if not isinstance(b, Plot)]), [b.title for b in _plots(blocks)]


def _plots(blocks: list) -> list[Plot]:
    return [b for b in blocks if isinstance(b, Plot) and b.png is not None]


def summary(report: dict) -> str:
    """A few lines for the terminal: what was gained and lost against the baseline."""
    lines = []
    ppl, base = report.get("perplexity"), (report.get("baseline") or {}).get("perplexity")
    if ppl is not None:
        delta = f" vs {base:.4f} for the baseline ({ppl / base - 1:+.2%})" if base else ""
        lines.append(f"perplexity {ppl:.4f}{delta} [{describe_protocol(report['protocol'])}]")
    kv = report.get("kv_cache")
    if kv:
        lines.append(f"perplexity through the KV cache {kv['perplexity']:.4f} vs {kv['full_cache_perplexity']:.4f} "
                     f"through a full-precision one ({kv['delta']:+.3%}) [{describe_protocol(kv['protocol'])}]")
    if report.get("kl"):
        lines.append(f"mean KL vs baseline {report['kl']['mean_kl']:.5f} nats, top-1 agreement "
                     f"{report['kl']['top1_agreement']:.2%} over {report['kl']['tokens']} tokens")
    agreement = (report.get("samples") or {}).get("agreement")
    if agreement:
        lines.append(f"greedy tokens identical to the baseline's: {agreement['identical_token_share']:.1%}")
    memory = report.get("memory") or {}
    if "model" in memory:
        size = " -> ".join(_mib(memory[k]["tensor_bytes"]) for k in ("baseline", "model") if k in memory)
        lines.append(f"weights in memory (MiB): {size}")
        layouts = memory["model"].get("layouts") or {}
        if layouts:
            lines.append("linear layers stored as: " + ", ".join(
                f"{name} x{row['layers']} ({row['stored_bytes'] / row['dense_bytes']:.3f}x dense"
                + (f", {row['sparsity']:.0%} pruned)" if row["sparsity"] else ")")
                for name, row in layouts.items() if row["dense_bytes"]))
    kv_memory = memory.get("model", {}).get("kv_cache_quantized")
    if kv_memory:
        lines.append(f"KV cache {kv_memory['scheme']}: {kv_memory['bytes_per_token']:,.0f} bytes a token at "
                     f"{kv_memory['context']} tokens ({kv_memory['vs_full']:.3f}x the full-precision cache's; "
                     + ", ".join(f"{r:.3f}x at {n}" for n, r in kv_memory["vs_full_at"].items()) + ")")
    for role, rows in ((report.get("speed") or {}).get("rows") or {}).items():
        timed = [r for r in rows if "decode_tok_s" in r]
        if timed:
            batch = min(r["batch"] for r in timed)
            cells = ", ".join(f"{r['config']} {r['decode_tok_s']:,.1f}" for r in timed if r["batch"] == batch)
            lines.append(f"{role} decode tok/s at batch {batch}: {cells}")
    for target in (report.get("speculative") or {}).get("targets", []):
        for r in target["rows"]:
            rate = f", acceptance {r['acceptance_rate']:.1%}" if "acceptance_rate" in r else ""
            lines.append(f"speculative, {target['label']} target, {r['method']}: identical "
                         f"{'yes' if r['identical'] else 'NO'}{rate}, speedup {_f(r['speedup'], '.2f')}x")
    return "\n".join(lines)
