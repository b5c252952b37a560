"""Several estimators from one gradient capture: each equals its own run, resumes per estimator, and agrees."""

from __future__ import annotations

import pytest
import torch

import layerif.influence.engine as engine
from layerif.api import ScoreConfig, score_layers
from layerif.errors import LayerIFError
from layerif.scores import AGGREGATIONS, LayerScores, estimator_agreement
from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts

TRAIN, VAL = tiny_texts(10, seed=60), tiny_texts(3, seed=61)
NAMES = "datainf,identity,exact"


def scores(config: ScoreConfig, **kwargs):
    return score_layers(tiny_llama(layers=3, seed=4), TinyTokenizer(), TRAIN, VAL, config, **kwargs)


@pytest.mark.parametrize("strategy", ["store", "spill"])
def test_each_estimator_equals_its_own_run(strategy):
    config = ScoreConfig(quiet=True, batch_size=4, estimator=NAMES + ",lissa", strategy=strategy)
    several = scores(config)
    assert list(several) == ["datainf", "identity", "exact", "lissa"]
    for name, got in several.items():
        alone = scores(ScoreConfig(quiet=True, batch_size=4, estimator=name, strategy=strategy))
        assert isinstance(alone, LayerScores) and got.metadata["estimator"] == name
        torch.testing.assert_close(got.q.double(), alone.q.double(), rtol=0, atol=1e-6 * alone.q.abs().max().item())
        assert got.metadata["estimator_s"] > 0
    assert several["lissa"].metadata["convergence"]["matrices"] == 21
    assert several["exact"].metadata["convergence"] is None
    assert not torch.allclose(several["identity"].q, several["exact"].q)  # the equalities are not trivial ones


def test_resume_after_a_crash_inside_the_second_estimator(tmp_path, monkeypatch):
    config = ScoreConfig(quiet=True, batch_size=4, max_memory=1, strategy="store", estimator=NAMES)
    clean = scores(config)
    real, calls = engine.influence_from_factors, {"exact": 0}

    def failing(name, *args, **kwargs):
        if name == "exact":
            calls["exact"] += 1
            if calls["exact"] > 10:  # inside the second layer group (7 matrices per block)
                raise KeyboardInterrupt("simulated crash")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(engine, "influence_from_factors", failing)
    with pytest.raises(KeyboardInterrupt):
        scores(config, checkpoint_dir=str(tmp_path))
    saved = sorted(path.stem for path in tmp_path.glob("layer-*.safetensors"))
    # the last block is done by all three; the middle one by datainf and identity, exact stopped within it
    assert saved == ["layer-0001.datainf", "layer-0001.identity", "layer-0002.datainf", "layer-0002.exact",
                     "layer-0002.identity"]
    monkeypatch.undo()
    counted: dict[str, int] = {}

    def counting(name, *args, **kwargs):
        counted[name] = counted.get(name, 0) + 1
        return real(name, *args, **kwargs)

    monkeypatch.setattr(engine, "influence_from_factors", counting)
    resumed = scores(config, checkpoint_dir=str(tmp_path))
    loaded = resumed["datainf"].metadata["resumed"]["units_loaded"]
    assert sorted(loaded) == sorted(saved)
    # block 1 is captured again for exact alone; block 0 gets all three
    assert counted == {"datainf": 7, "identity": 7, "exact": 14}
    for name in clean:
        torch.testing.assert_close(resumed[name].q, clean[name].q, rtol=1e-6, atol=0)


def test_stream_and_bad_lists_are_refused():
    with pytest.raises(LayerIFError, match="--strategy stream scores one estimator"):
        ScoreConfig(estimator="datainf,identity", strategy="stream").validate()
    with pytest.raises(LayerIFError, match="^unknown estimator 'tracin'; choose from"):
        ScoreConfig(estimator="datainf,tracin").validate()
    with pytest.raises(LayerIFError, match="names 'exact' twice"):
        ScoreConfig(estimator="exact,datainf,exact").validate()
    assert ScoreConfig(estimator="exact,datainf").estimators == ["exact", "datainf"]


def test_agreement_rows_are_spearman_of_the_profiles():
    from scipy.stats import spearmanr

    several = scores(ScoreConfig(quiet=True, batch_size=4, estimator=NAMES))
    rows = estimator_agreement(several)
    assert [(row["a"], row["b"]) for row in rows] == [("datainf", "identity"), ("datainf", "exact"),
                                                      ("identity", "exact")]
    for row in rows:
        for how in AGGREGATIONS:
            want = spearmanr(several[row["a"]].scores(how), several[row["b"]].scores(how)).statistic
            assert row[how] == pytest.approx(want)
