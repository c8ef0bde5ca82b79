"""The mode table (deconvnet.inference.modes.MODE_TABLE) is the one source of
inference defaults: change one of its values and every user follows, the
segment job's config, both command lines' defaults and training's evaluation."""

from __future__ import annotations

import pytest

from deconvnet.inference import MODE_TABLE, for_mode
from deconvnet.inference.proposals import ProposalConfig
from deconvnet.inference.segmenter import SegmenterConfig


@pytest.fixture
def changed_table(monkeypatch):
    """The default mode with 7 proposals and batches of 5 (instead of 50 and 32)."""
    monkeypatch.setitem(MODE_TABLE["default"], "proposals", {**MODE_TABLE["default"]["proposals"], "max_proposals": 7})
    monkeypatch.setitem(MODE_TABLE["default"], "segmenter", {**MODE_TABLE["default"]["segmenter"], "batch_size": 5})


def _follows(cfg) -> bool:
    return (cfg.proposals.max_proposals, cfg.segmenter.batch_size) == (7, 5)


def test_every_user_follows_the_mode_table(changed_table):
    from jobs import segment_dataset, train
    from deconvnet.__main__ import build_parser
    from deconvnet.training.recipe import config_for
    from pipeline.config import SegmentJobConfig

    assert _follows(for_mode()) and _follows(for_mode("original"))  # original inherits both
    assert (ProposalConfig().max_proposals, SegmenterConfig().batch_size) == (7, 5)

    job = SegmentJobConfig(input="in", output="out", model="m")
    assert _follows(job.inference_config())
    assert (job.record()["max_proposals"], job.record()["batch_size"]) == (7, 5)

    a = segment_dataset.build_parser().parse_args(["--input", "i", "--output", "o", "--model", "m"])
    assert (a.max_proposals, a.batch_size) == (7, 5)
    assert "(default: 7)" in " ".join(segment_dataset.build_parser().format_help().split())
    parser, sub = build_parser()
    a = parser.parse_args(["segment", "x.jpg", "--model", "m", "--out", "o.png"])
    assert (a.max_proposals, a.batch_size) == (7, 5)
    assert "(default: 7)" in " ".join(sub.choices["segment"].format_help().split())

    run = config_for("tiny", data="d", storage="s", name="n")
    evaluation = run.evaluation()
    assert _follows(evaluation) and evaluation.crf is None and evaluation.mode == "default"
    assert evaluation.proposals == for_mode(crf="none").proposals  # the segment job's, so the same val mIoU
    assert run.stage2_proposals().max_proposals == 7
    assert run.record()["eval_max_proposals"] == 7
    assert "val proposals per image (+ the whole image), as the segment job's --max-proposals (default: 7)" \
        in " ".join(train.parser_and_flags()[0].format_help().split())


def test_a_changed_default_mode_value_reaches_the_segment_job_and_training_alike(monkeypatch):
    from deconvnet.training.recipe import config_for
    from pipeline.config import SegmentJobConfig

    monkeypatch.setitem(MODE_TABLE["default"], "segmenter", {**MODE_TABLE["default"]["segmenter"], "pad": "black"})
    job = SegmentJobConfig(input="in", output="out", model="m").inference_config()
    run = config_for("tiny", data="d", storage="s", name="n").evaluation()
    assert job.segmenter == run.segmenter and job.segmenter.pad == "black"
    assert job.proposals == run.proposals


def test_settings_are_checked_where_they_are_used_and_named_by_field():
    from pipeline.config import SegmentJobConfig

    with pytest.raises(ValueError) as e:
        SegmentJobConfig(input="in", output="out", model="m", max_proposals=-1, batch_size=0, crf_max_side=0,
                         limit=0)
    message = str(e.value)
    for part in ("`max_proposals` must be >= 0, got -1", "`batch_size` must be >= 1, got 0",
                 "`crf_max_side` must be >= 1, got 0", "`limit` must be >= 1, got 0"):
        assert part in message
    assert "--" not in message  # fields, never flags
    with pytest.raises(ValueError, match="`crf` must be one of deeplab, paper, none, got 'fast'"):
        for_mode(crf="fast")
    with pytest.raises(ValueError, match="`proposals` must be one of"):
        for_mode(proposals="sliding")
    with pytest.raises(ValueError, match="`pad`"):
        for_mode("original", pad="mean")  # the release's rules are fixed
    with pytest.raises(ValueError, match="`colour` is not an inference setting"):
        for_mode(colour="red")
