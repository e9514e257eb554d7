"""`python -m priming_jax.main` end to end on a tiny model: stages, report, kill -9 resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_hf_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (so the real corpus tokenizes for it)."""
    from priming_jax.checkpoint import load_tokenizer
    from priming_jax.gguf_io import default_smollm2_gguf

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer(default_smollm2_gguf())
    tiny_hf_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = tmp_path_factory.mktemp("corpus")
    for d in range(4):
        (corpus / f"doc{d}.txt").write_text("\n".join(f"Line {i} of {d}: to be, or not to be." for i in range(120)))
    return folder, corpus


def main(argv):
    """Run `python -m priming_jax.main` as a user would; returns (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "priming_jax.main", *argv[1:]], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc.returncode, proc.stderr


def flags(source, corpus, workdir, *extra):
    return ["main", f"--config.source={source}", f"--config.workdir={workdir}",
            f"--config.data.sources=('{'dir' if corpus.is_dir() else 'txt'}:{corpus}',)", f"--config.data.cache_dir={workdir}/cache",
            "--config.data.seq_len=32", "--config.data.eval_batches=2", "--config.data.eval_batch_size=2",
            "--config.data.heldout_fraction=0.0", "--config.hybrid.gka_num_iter=3", "--config.hybrid.chunk_size=16",
            "--config.align.batch_size=2", "--config.posttrain.batch_size=2", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", *extra]


def test_main_end_to_end(tiny_source, tmp_path):
    source, corpus = tiny_source
    workdir = tmp_path / "run"
    code, err = main(flags(source, corpus, workdir, "--config.align.steps=4", "--config.posttrain.steps=2",
                           "--config.data.heldout_fraction=0.5"))
    assert code == 0, err
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["perplexity"]) == {"teacher", "init", "align", "posttrain"}
    assert report["tokens"] == {"align": 4 * 2 * 32, "posttrain": 2 * 2 * 32}
    assert "gap_closed" in report and (workdir / "report.md").is_file() and (workdir / "loss_curve.png").is_file()
    records = [json.loads(x) for x in (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "align"] == [1, 2, 3, 4]
    assert list((workdir / "metrics" / "tensorboard").glob("events.out.tfevents.*"))


def test_kill_and_resume_matches_uninterrupted(tiny_source, tmp_path):
    """kill -9 mid-stage, rerun the same command: later losses equal an uninterrupted run's (≤ 1e-6)."""
    source, corpus = tiny_source
    args = ["--config.stages=prime,align", "--config.align.steps=8", "--config.data.heldout_fraction=0.5"]

    def command(workdir):
        return [sys.executable, "-m", "priming_jax.main", *flags(source, corpus, workdir, *args)[1:]]

    def losses(workdir):
        lines = (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}  # a rerun's records overwrite

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, cwd=REPO, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(command(cut), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (cut / "align" / "ckpt" / "4").is_dir():  # wait for a checkpoint mid-stage
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-4 checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "align" / "model").exists()
    subprocess.run(command(cut), check=True, env=env, cwd=REPO, capture_output=True)
    whole, resumed = losses(tmp_path / "whole"), losses(cut)
    assert sorted(whole) == sorted(resumed) == list(range(1, 9))
    assert max(abs(whole[s] - resumed[s]) for s in range(5, 9)) <= 1e-6


@pytest.mark.parametrize("case", ["missing_source", "empty_corpus", "seq_len", "unknown_key", "vocab"])
def test_bad_inputs(tiny_source, tmp_path, case):
    source, corpus = tiny_source
    extra, expect_code, expect = [], 1, ""
    if case == "missing_source":
        source, expect = tmp_path / "missing", "missing"
    elif case == "empty_corpus":
        corpus, expect = tmp_path / "empty.txt", "empty.txt"
        corpus.write_text("")
        extra = ["--config.data.heldout_fraction=0.0"]
    elif case == "seq_len":
        extra, expect = ["--config.data.seq_len=100000"], "max_position_embeddings"
    elif case == "unknown_key":
        extra, expect_code, expect = ["--config.align.nonexistent=1"], 2, "nonexistent"
    else:  # a model whose vocabulary is smaller than the tokenizer's
        small = tmp_path / "small"
        tiny_hf_model("llama", vocab_size=1000).save_pretrained(small)
        for f in source.glob("tokenizer*"):
            (small / f.name).write_bytes(f.read_bytes())
        source, expect = small, "vocabulary"
    code, err = main(flags(source, corpus, tmp_path / "run", *extra))
    assert code == expect_code and expect in err, err
