"""A model family added the way CONTRIBUTING.md describes: a module with MODEL_TYPE, Config, checkpoint_shapes,
sanitize and decoder_layer, registered with tinyhun.families.register. This one is Llama under another model_type
whose config.json names the RMSNorm epsilon `layer_norm_epsilon`; on a Llama checkpoint it gives Llama's logits."""
import dataclasses
import json
import shutil
import types
from dataclasses import dataclass

import numpy as np
import pytest

import tinyhun
from oracle import ROOT
from tinyhun import families
from tinyhun.config import Fields
from tinyhun.errors import TinyhunError
from tinyhun.families import llama

TINY = ROOT / "weights" / "tiny-llama"
EPS = 0.05   # far from Llama's default 1e-5: a family that missed its key would give other logits
IDS = [448, 7, 93, 200, 12, 301, 55]


@dataclass(frozen=True)
class EpsConfig(llama.Config):
    @classmethod
    def from_dict(cls, d, source="config.json"):
        cfg = super().from_dict(d, source)
        return dataclasses.replace(cfg, rms_norm_eps=Fields(d, source).number("layer_norm_epsilon"))


def eps_family():
    """The family module, as tinyhun/families/llama_eps.py would define it."""
    m = types.ModuleType("llama_eps")
    m.MODEL_TYPE = "llama_eps"
    m.Config = EpsConfig
    m.checkpoint_shapes, m.sanitize, m.decoder_layer = llama.checkpoint_shapes, llama.sanitize, llama.decoder_layer
    return m


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))   # the registration ends with the test
    return families.register(eps_family())


def model_folder(tmp_path, name, **changes):
    """tiny-llama copied to tmp_path/name, its config.json updated (a None value removes the key)."""
    folder = tmp_path / name
    shutil.copytree(TINY, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


def test_new_family_gives_the_llama_logits(tmp_path, registered):
    original = tinyhun.load(model_folder(tmp_path, "llama", rms_norm_eps=EPS))
    new = tinyhun.load(model_folder(tmp_path, "new", model_type="llama_eps", rms_norm_eps=None,
                                    layer_norm_epsilon=EPS))
    assert new.family is registered and new.config.rms_norm_eps == EPS
    expected = original.logits(IDS)
    np.testing.assert_array_equal(new.logits(IDS), expected)
    default_eps = tinyhun.load(model_folder(tmp_path, "default", rms_norm_eps=None))
    assert not np.allclose(default_eps.logits(IDS), expected)   # the epsilon shows in the logits


def test_new_family_config_is_checked(tmp_path, registered):
    folder = model_folder(tmp_path, "new", model_type="llama_eps")
    with pytest.raises(TinyhunError, match="missing required field 'layer_norm_epsilon'"):
        tinyhun.load(folder)


def test_unregistered_family_is_refused(tmp_path):
    with pytest.raises(TinyhunError, match="model_type 'llama_eps' is not supported"):
        tinyhun.load(model_folder(tmp_path, "new", model_type="llama_eps", layer_norm_epsilon=EPS))
