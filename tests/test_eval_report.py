"""Reports: the run JSON's keys, Markdown tables, the self-contained HTML with its plots, and merging runs
with `compress report` (a shared baseline shown once; different perplexity protocols never in one table)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import compress
from compress_cli import cli
from compress.eval.data import EvalText
from compress.eval.render import to_markdown
from compress.eval.report import document, write_document
from compress.eval.tasks import Subject, evaluate_subjects
from compress.model import load_tokenizer
from compress.eval.spec import EvalSpec
from conftest import REPO, make_tiny

TEXT = EvalText((REPO / "README.md").read_text(), "README.md", "")
SPEC = dict(tasks=["ppl", "kl", "samples", "memory", "speed"], seq_len=32, max_tokens=256, kl_tokens=128,
            max_new_tokens=6, speed=dict(configs=["dynamic"], batch_sizes=[1], prompt_len=8, new_tokens=4,
                                         warmup=0, repeats=1, mixed_requests=0))


def quantized(bits: int):
    return compress.apply(make_tiny("qwen2"), [{"method": "rtn", "args": {"bits": bits, "group_size": 64}}],
                          device="cpu")


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    tok = load_tokenizer(str(REPO / "recipes" / "models" / "tiny-llama"))
    base = Subject(make_tiny("qwen2"), "models/qwen2-tiny", "qwen2-tiny (baseline)")
    w4, w8 = Subject(quantized(4), "out/w4", "w4"), Subject(quantized(8), "out/w8", "w8")
    short = {**SPEC, "seq_len": 16, "tasks": ["ppl"]}
    return {"w4": evaluate_subjects(w4, EvalSpec(**SPEC), tok, base, TEXT, progress=False),
            "w8": evaluate_subjects(w8, EvalSpec(**SPEC), tok, base, TEXT, progress=False),
            "w4-16": evaluate_subjects(w4, EvalSpec(**short), tok, base, TEXT, progress=False)}


def test_run_json_has_the_promised_top_level(runs) -> None:
    report = json.loads(json.dumps(runs["w4"]))  # JSON-ready as it is
    assert isinstance(report["perplexity"], float) and isinstance(report["baseline"]["perplexity"], float)
    assert report["perplexity"] == report["ppl"]["model"]["perplexity"]
    assert report["ppl"]["delta"] == pytest.approx(report["perplexity"] / report["baseline"]["perplexity"] - 1)
    assert report["protocol"] == {"seq_len": 32, "stride": None, "bos": False, "max_tokens": 256, "text": "README.md",
                                  "join": "", "text_sha256": TEXT.sha256}
    env = report["environment"]
    assert env["gpu"] is None and env["device"] == "cpu"
    assert {"torch", "transformers", "compress"} <= set(env)
    assert {"ppl", "kl", "samples", "memory", "speed"} <= set(report) and "speculative" not in report
    assert report["models"]["model"]["compression"][0]["method"] == "rtn"
    assert 0 <= report["kl"]["top1_agreement"] <= 1 and report["kl"]["mean_kl"] >= 0
    assert report["kl"]["tokens"] == 4 * 31  # 128 tokens: 4 windows of 32, 31 predictions each


def test_markdown_has_the_tables(runs) -> None:
    text = to_markdown(document([runs["w4"]]))
    assert "| model | dtype | size MiB | perplexity | Δ vs baseline |" in text
    assert re.search(r"\| w4 \| float32 \| [\d.]+ \| [\d.]+ \| [+-][\d.]+% \|", text)
    assert "| qwen2-tiny (baseline) | float32 |" in text
    assert "| w4 | dynamic | 1 | 4 |" in text
    assert "The quick brown fox jumped over the" in text
    assert "![Perplexity vs size](perplexity_vs_size.png)" in text


def test_html_is_self_contained_with_plots(runs, tmp_path: Path) -> None:
    paths = write_document([runs["w4"]], tmp_path)
    assert [p.name for p in paths] == ["perplexity_vs_size.png", "memory.png", "decode_speed.png", "report.md",
                                       "report.html"]
    html = paths[-1].read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', html)
    assert [alt for alt, _ in images] == ["Perplexity vs size", "Memory", "Decode speed"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in images)
    assert "<table>" in html and "src=\"http" not in html and "<link" not in html
    assert (tmp_path / "perplexity_vs_size.png").read_bytes().startswith(b"\x89PNG")


def _cli(args: list[str]):
    return CliRunner().invoke(cli, args, obj={})


def _write(runs: dict, names: list[str], folder: Path) -> list[str]:
    paths = []
    for name in names:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(runs[name]))
        paths.append(str(path))
    return paths


def test_report_merges_runs_and_shows_a_shared_baseline_once(runs, tmp_path: Path) -> None:
    result = _cli(["report", *_write(runs, ["w4", "w8"], tmp_path)])
    assert result.exit_code == 0, result.output
    quality = result.output.split("## Memory")[0]
    assert quality.count("Protocol: ") == 1
    assert [line.split(" | ")[0] for line in quality.splitlines() if line.startswith("| ") and "float32" in line] == \
        ["| w4", "| qwen2-tiny (baseline)", "| w8"]


def test_report_never_mixes_protocols_in_one_table(runs, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = _cli(["report", *_write(runs, ["w4", "w8", "w4-16"], tmp_path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "2 perplexity protocols: one table each" in text
    sections = text.split("## Memory")[0].split("Protocol: ")[1:]
    assert [s.split(",")[0:2] for s in sections] == [["README.md", " 32-token windows (non-overlapping)"],
                                                     ["README.md", " 16-token windows (non-overlapping)"]]
    ppl16 = f"{runs['w4-16']['perplexity']:.4f}"
    assert ppl16 in sections[1] and ppl16 not in sections[0]
    assert (out / "report.html").exists()


def test_printed_report_links_no_image_and_says_plots_need_output(runs, tmp_path: Path) -> None:
    """Without --output nothing is written, so the printed Markdown must not link PNG files (issue 19, finding 12)."""
    result = _cli(["report", *_write(runs, ["w4", "w8"], tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| w4 | float32 |" in result.stdout
    assert "![" not in result.stdout and ".png" not in result.stdout
    assert re.search(r"3 plots \(perplexity vs size, memory, decode speed\) are not printed: pass --output DIR to "
                     r"write them as PNG files", result.stderr), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4.json", "w8.json"]


def test_report_output_lists_every_file_it_wrote(runs, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = _cli(["report", *_write(runs, ["w4", "w8"], tmp_path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    listed = sorted(line.removeprefix("wrote ") for line in result.output.splitlines())
    assert listed == sorted(str(p) for p in out.iterdir())
    assert {Path(p).name for p in listed} == {"report.md", "report.html", "perplexity_vs_size.png", "memory.png",
                                              "decode_speed.png"}


@pytest.mark.parametrize("content, message", [
    (None, r"error: report not found: .*missing\.json"),
    ('{"perplexity": 5.0}', r"is not a compress eval report \(no \"schema\": \"compress\.eval/1\"\); write one with"),
    ("{not json", r"error: cannot read report .*bad\.json: Expecting property name"),
])
def test_report_rejects_what_is_not_a_report(content: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    result = _cli(["report", str(path)])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
