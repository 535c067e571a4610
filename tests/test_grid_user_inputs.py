"""A paper-scale grid takes the user's own checkpoint and data folder per model block (issue 14 item 6)."""
from pathlib import Path

import pytest

from rex.pipeline import grid

ROOT = Path(__file__).resolve().parents[1]


def _config(**block):
    return {"name": "t", "results_dir": "/tmp/rex-user-inputs", "protocol": {},
            "models": [{"model": "minilm_l6", "limit": 8, "methods": [{"method": "rtn", "bits": [[8, 32]]}], **block}]}


def test_user_weights_and_data_root_reach_every_job_and_its_identity():
    plain = grid.expand(_config(), ROOT)
    user = grid.expand(_config(weights="/data/my-minilm", data_root="/data/stsb"), ROOT)
    assert len(plain) == len(user) == 2  # FP32 + RTN
    for p, u in zip(plain, user):
        assert "model.weights=/data/my-minilm" in u["overrides"] and "dataset.root=/data/stsb" in u["overrides"]
        assert not any(o.startswith(("model.weights=", "dataset.root=")) for o in p["overrides"])
        # another checkpoint or data folder gives other numbers: another folder, the FP32 row's too
        assert u["label"] != p["label"] and u["variant"] and not p["variant"]
    other = grid.expand(_config(weights="/data/other-minilm", data_root="/data/stsb"), ROOT)
    assert {j["label"] for j in other}.isdisjoint({j["label"] for j in user})


def test_a_user_checkpoint_replaces_training_here():
    cfg = {"name": "t", "results_dir": "/tmp/rex-user-inputs", "protocol": {},
           "models": [{"model": "resnet20_fmnist", "limit": 8, "weights": "/data/my-resnet20.pt",
                       "methods": [{"method": "rtn", "bits": [[8, 8]]}]}]}
    assert grid.train_specs(cfg, ROOT) == {}
    jobs = grid.expand(cfg, ROOT)
    assert all(j["checkpoint"] == "/data/my-resnet20.pt" for j in jobs)
    assert all("model.weights=/data/my-resnet20.pt" in j["overrides"] for j in jobs)


def test_the_schema_names_a_misspelt_block_key():
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    with pytest.raises(grid.GridError, match="did you mean 'weights'"):
        grid.check_keys(_config(weigths="/data/x"), schema)
