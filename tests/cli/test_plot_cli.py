"""`moco-plot <run folder>`: the training curves of a run from its csv/metrics.csv, as one PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from moco_lightning.cli.plot import main, read_metrics

# the layout of Lightning's CSVLogger: step metrics and epoch metrics on separate rows, empty cells elsewhere
METRICS_CSV = """dictionary/key_drift,epoch,step,train/loss,train/lr,train/momentum,val/alignment,val/knn_top1
0.01,0,0,6.0,0.03,0.99,,
0.02,0,1,5.5,0.03,0.99,,
,0,1,,,,0.9,0.55
0.03,1,2,5.0,0.02,0.99,,
0.04,1,3,nan,0.01,0.99,,
,1,3,,,,0.8,0.65
"""


def _run(tmp_path: Path) -> Path:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(METRICS_CSV)
    return tmp_path


def test_metrics_are_read_per_column_with_their_steps(tmp_path):
    series = read_metrics(_run(tmp_path) / "csv" / "metrics.csv")
    assert series["val/knn_top1"] == ([1.0, 3.0], [0.55, 0.65])
    steps, losses = series["train/loss"]
    assert steps == [0.0, 1.0, 2.0, 3.0] and losses[:3] == [6.0, 5.5, 5.0] and losses[3] != losses[3]  # nan kept
    assert "epoch" not in series and "step" not in series


def test_moco_plot_writes_one_png_into_the_run_folder(tmp_path, capsys):
    main([str(_run(tmp_path))])
    path = tmp_path / "training_curves.png"
    assert f"training curves: {path}" in capsys.readouterr().out
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05


def test_moco_plot_without_metrics_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no metrics.csv under") and err.count("\n") == 1
