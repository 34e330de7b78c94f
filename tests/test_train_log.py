"""diffkit.train.training_seconds: a run's training wall time from its metrics log."""
import json

from diffkit.train import training_seconds


def test_training_seconds_reads_the_last_elapsed_time_of_the_metrics_log(tmp_path):
    rows = [{"step": 100, "loss": 1.0, "elapsed_s": 12.5}, {"step": 200, "loss": 0.5, "elapsed_s": 30.25},
            {"event": "resumed"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert training_seconds(tmp_path, fallback=-1.0) == 30.25
    assert training_seconds(tmp_path / "missing", fallback=7.0) == 7.0      # no log: the fallback
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert training_seconds(tmp_path, fallback=3.0) == 3.0                  # no elapsed_s: the fallback
