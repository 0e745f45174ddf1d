"""`deit-fast demo` end to end, cut to two steps per epoch: teacher, student, distilled student,
the table, and every run's files."""
import json
import os

import torch

from deit_fast.cli import main


def test_demo_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        main(["demo", "--output_dir", str(tmp_path), "--epochs", "1", "--teacher-epochs", "1",
              "--steps-per-epoch", "2", "--num_workers", "0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "test top-1 %" in out and "deit_tiny_distilled_hard" in out
    results = json.load(open(tmp_path / "results.json"))
    names = ["teacher", "deit_tiny", "deit_tiny_distilled_hard", "deit_tiny_distilled_soft"]
    assert [r["name"] for r in results["runs"]] == names
    assert results["runs"][2]["train_loss_distill"] > 0 and results["runs"][3]["train_loss_distill"] > 0
    for name in names:
        assert {"checkpoint.pth", "log.jsonl", "model.safetensors"} <= set(os.listdir(tmp_path / name))
