"""The calibration engine logs its walk over the decoder blocks (issue 19, finding 9): where no progress bar is
shown (a log file, CI), the lines say the job is alive, without flooding the log of a deep model."""

from __future__ import annotations

import logging
import re

import pytest
import transformers as tf

import compress

PROGRESS = re.compile(r"^(?P<labels>.+): block (?P<i>\d+) of (?P<n>\d+) done, (?P<s>\d+\.\d) s elapsed$")


def _progress(caplog) -> list[re.Match]:
    return [m for r in caplog.records if r.name == "compress.calibration.engine" and r.levelno == logging.INFO
            and (m := PROGRESS.match(r.getMessage()))]


def _model(layers: int):
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_every_block_of_a_shallow_model_is_logged_with_the_step_labels(caplog) -> None:
    caplog.set_level(logging.INFO, logger="compress")
    steps = [{"method": "rtn", "args": {"bits": 4, "group_size": 64}, "targets": ["*.mlp.*"]},
             {"method": "int8", "targets": ["*.self_attn.*"]}]
    compress.apply(_model(3), steps, device="cpu")
    lines = _progress(caplog)
    assert [(m["labels"], int(m["i"]), int(m["n"])) for m in lines] == [("rtn, int8", i, 3) for i in (1, 2, 3)]
    elapsed = [float(m["s"]) for m in lines]
    assert elapsed == sorted(elapsed)


@pytest.mark.parametrize("blocks", [21, 80])
def test_a_deep_model_logs_about_every_5_percent_and_the_last_block(blocks: int, caplog) -> None:
    caplog.set_level(logging.INFO, logger="compress")
    compress.apply(_model(blocks), [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")
    done = [int(m["i"]) for m in _progress(caplog)]
    assert 10 <= len(done) <= 21, done
    assert done[-1] == blocks and done == sorted(set(done))
    gaps = {b - a for a, b in zip([0, *done], done)}
    assert max(gaps) <= -(-blocks // 20), done  # no stretch longer than 5% of the model without a line
