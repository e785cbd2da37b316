"""minibert.plot: loss against steps or tokens seen, each run's global batch in the legend."""

import json

import pytest
from matplotlib.figure import Figure

from conftest import ASSETS, BERT_TINY
from minibert.errors import MinibertError
from minibert.plot import parse_args, plot_runs, run
from minibert.train_config import TrainConfig
from minibert.trainer import train


def write_run(folder, global_batch, seq_len, steps):
    """metrics.jsonl as the trainer writes it: a line at step 0 and every 10 steps."""
    folder.mkdir()
    lines = [{"step": s, "global_batch": global_batch, "tokens": s * global_batch * seq_len,
              **({"train_loss": 5.0 - s / 100} if s else {}), **({"eval_loss": 4.0} if s % 20 == 0
                                                                   else {})}
             for s in range(0, steps + 1, 10)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot_runs draws, kept when it saves them."""
    figures = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_tokens_axis_and_global_batch_in_the_legend(tmp_path, drawn):
    small = write_run(tmp_path / "batch-32", 32, 128, 40)
    large = write_run(tmp_path / "batch-64", 64, 128, 20)
    run(parse_args([str(tmp_path / "batch-32"), str(tmp_path / "batch-64"), "--x", "tokens",
                     "-o", str(tmp_path / "compare.png")]))
    assert (tmp_path / "compare.png").stat().st_size > 0
    ax = drawn[-1].axes[0]
    assert ax.get_xlabel().startswith("tokens seen")
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert lines["batch-32 (global batch 32) train"] == [r["tokens"] for r in small[1:]]
    assert lines["batch-64 (global batch 64) train"] == [r["tokens"] for r in large[1:]]
    assert lines["batch-64 (global batch 64) eval"] == [0, 20 * 64 * 128]
    # Against steps (the default), the same runs.
    plot_runs([tmp_path / "batch-32"], tmp_path / "steps.png")
    ax = drawn[-1].axes[0]
    assert ax.get_xlabel() == "optimizer step"
    assert list(ax.get_lines()[0].get_xdata()) == [10, 20, 30, 40]


def test_old_metrics_without_tokens_need_steps(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 4.0}\n')
    with pytest.raises(MinibertError, match="without 'tokens'.*--x steps"):
        plot_runs([tmp_path / "old"], tmp_path / "x.png", x="tokens")
    plot_runs([tmp_path / "old"], tmp_path / "x.png")  # against steps it still plots


def test_the_trainer_logs_tokens_and_global_batch(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (ASSETS / "corpus" / "wikipedia-sample" / "train.txt").read_text(encoding="utf-8")
    (corpus / "train.txt").write_text(text[:3000], encoding="utf-8")
    (corpus / "valid.txt").write_text(text[3000:4000], encoding="utf-8")
    train(TrainConfig(model=str(BERT_TINY), data=str(corpus), out_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), max_seq_length=32, batch_size=2,
                      grad_accum=2, max_steps=3, device="cpu", precision="fp32", log_every=1,
                      eval_every=2, save_every=0), environ={})
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["global_batch"] == 4 and r["tokens"] == r["step"] * 4 * 32 for r in records)
