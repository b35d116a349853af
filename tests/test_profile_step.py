"""benchmarks/profile_step.py: the table logic (fast) and a tiny 32 x 32 profile of the real step (slow)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_step  # noqa: E402


def test_summary_shares_and_backward_difference(tmp_path):
    times = {"forward + loss": [0.010, 0.012, 0.011], "forward + loss + gradient": [0.030, 0.031, 0.029],
             profile_step.WHOLE: [0.100, 0.090, 0.110], "data: next batch (host)": [0.001, 0.002, 0.001]}
    rows = {r["part"]: r for r in profile_step.summarize(times)}
    assert rows[profile_step.WHOLE]["share"] == 1.0
    assert rows["forward + loss"]["median_ms"] == pytest.approx(11.0)
    assert rows["backward (difference)"]["median_ms"] == pytest.approx(19.0)
    assert rows["data: next batch (host)"]["share"] == pytest.approx(0.01)
    out = tmp_path / "t.md"
    profile_step.write_table(str(out), list(rows.values()), "header")
    assert "| backward (difference) | 19.00 | 19.0 % |" in out.read_text()


def test_bad_options_are_refused_before_tensorflow():
    for argv in (["--steps", "0"], ["--image-size", "8"], ["--out", "x.txt"], ["--threads", "-1"]):
        with pytest.raises(SystemExit, match="error"):
            profile_step.main(argv)


@pytest.mark.slow  # 67 s on 2 shared cores (load 7): builds the model, traces ~20 functions
def test_tiny_profile_names_every_part_with_sane_shares(tmp_path):
    out = tmp_path / "p.csv"
    rows = profile_step.main(["--image-size", "32", "--num-pairs", "6", "--steps", "3", "--warmup", "1",
                              "--out", str(out), "--train-args", "--int-steps", "1", "--cache-dir",
                              str(tmp_path / "cache"), "--enc-features", "8", "16", "16", "16",
                              "--dec-features", "16", "16", "16", "16", "16", "8", "8", "--hyp-units", "16"])
    parts = {r["part"]: r for r in rows}
    for name in ("data: next batch (host)", "forward: U-Net + hypernetwork", "forward: integration + warp",
                 "loss: NCC", "loss: regularizer", "backward (difference)", "optimizer apply (Adam, TensorFlow kernels)",
                 profile_step.WHOLE, profile_step.XLA_WHOLE):
        assert name in parts and parts[name]["median_ms"] > 0, name
    assert parts[profile_step.WHOLE]["share"] == 1.0
    # pieces are parts of the step: each cheaper than the whole step (generous: a shared machine)
    for name in ("forward: whole model", "loss: all terms", "parameter maps"):
        assert parts[name]["share"] < 1.0, parts[name]
    assert out.read_text().startswith("part,median_ms,share")
