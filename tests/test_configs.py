"""Settings as types (hypermorph_spatially_adaptive.configs): LossConfig reads every config.json
'loss' this code has written, RefineConfig is the one home of the refinement options."""
import json

import pytest

from hypermorph_spatially_adaptive.configs import LossConfig, RefineConfig, check_same_weighting
from hypermorph_spatially_adaptive.params import HypMapping

#: config.json "loss" as training writes it today (elastic SA run, log mapping, K = 30)
TODAY = {"ncc_win": 9, "reg_field": "disp", "hyp_sampling": "per-sample U(0,1)", "oversample_endpoints": 0.0,
         "energy_scale": 30.0, "hyp_mapping": {"kind": "log", "decades": 2.0}, "spacing": [1.5, 1.5]}


def test_todays_loss_dict_loads_and_is_written_back_unchanged():
    loss = LossConfig.from_dict(json.loads(json.dumps(TODAY)))
    assert loss == LossConfig(ncc_win=9, spacing=(1.5, 1.5), energy_scale=30.0, hyp_mapping=HypMapping("log", 2.0),
                              reg_field="disp", oversample_endpoints=0.0, hyp_sampling="per-sample U(0,1)")
    assert loss.to_dict() == TODAY and list(loss.to_dict()) == list(TODAY)
    assert LossConfig.from_run_config({"loss": TODAY}) == loss


def test_runs_recorded_before_a_setting_existed_load_with_what_they_were_trained_with():
    older = {"ncc_win": 5, "reg_field": "svf", "spacing": [1.0, 1.0], "hyp_sampling": "per-sample U(0,1)"}
    loss = LossConfig.from_dict(older)
    assert (loss.energy_scale, loss.hyp_mapping, loss.oversample_endpoints) == (1.0, HypMapping(), 0.0)
    assert (loss.ncc_win, loss.reg_field, loss.spacing) == (5, "svf", (1.0, 1.0))
    assert LossConfig.from_run_config({}) == LossConfig() == LossConfig.from_dict(None)
    assert check_same_weighting({"a": {"loss": older}, "b": {"loss": {"energy_scale": 1.0}}}) == 1.0


@pytest.mark.parametrize("bad, msg", [({"ncc_win": 0}, "ncc_win"), ({"spacing": [1.0, -1.0]}, "spacing"),
                                      ({"energy_scale": -1.0}, "energy_scale"), ({"reg_field": "u"}, "reg_field"),
                                      ({"oversample_endpoints": 1.5}, "oversample_endpoints"),
                                      ({"ncc": 9}, "does not know")])
def test_loss_config_refuses_bad_values_and_unknown_keys(bad, msg):
    with pytest.raises(ValueError, match=msg):
        LossConfig.from_dict(bad)


def test_with_spacing_changes_only_the_spacing():
    loss = LossConfig.from_dict(TODAY)
    coarse = loss.with_spacing([3.0, 3.0])
    assert coarse.spacing == (3.0, 3.0) and coarse.to_dict() == {**TODAY, "spacing": [3.0, 3.0]}


def test_refine_config_original_is_the_voxelwise_refinement():
    orig = RefineConfig.original()
    assert orig.to_dict() == {"fold_weight": 0.0, "fold_eps": 0.1, "logj_weight": 0.0, "smooth": 0, "grid": 1,
                              "svf": False, "int_steps": 7, "scale": 1, "levels": None, "level_split": None}
    assert RefineConfig().to_dict() == {"fold_weight": 100.0, "fold_eps": 0.1, "logj_weight": 1.0, "smooth": 3,
                                        "grid": 2, "svf": False, "int_steps": 7, "scale": 0, "levels": [4, 2, 1],
                                        "level_split": None}
