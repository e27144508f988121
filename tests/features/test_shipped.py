"""The shipped whitening and codebook (codebooks/): they load without pickles, match their
recorded fingerprints, and refuse an extractor they were not learned for."""
import numpy as np
import pytest
import torch

from how_met.asmk.codebook import Codebook
from how_met.features.checkpoints import build_model, load_model
from how_met.features.network import model_fingerprint
from how_met.features.settings import DEFAULT_SHIPPED, ModelMismatchError, check_model, shipped_path
from how_met.features.shipped import apply_whitening, read_whitening, save_whitening


@pytest.fixture(scope="session")
def shipped_model():
    return load_model(DEFAULT_SHIPPED)


def test_shipped_model_matches_its_recorded_fingerprint(shipped_model):
    weight, bias, meta = read_whitening(shipped_path(DEFAULT_SHIPPED, "whitening"))
    assert meta["name"] == DEFAULT_SHIPPED and meta["version"] == 1
    assert shipped_model.has_whitening
    assert model_fingerprint(shipped_model) == meta["model_fingerprint"]
    reduction = shipped_model.dim_reduction
    assert np.array_equal(reduction.weight.detach().numpy()[:, :, 0, 0], weight)
    assert np.array_equal(reduction.bias.detach().numpy(), bias)
    assert shipped_path(DEFAULT_SHIPPED, "whitening").stat().st_size < 400_000


def test_shipped_codebook_belongs_to_the_shipped_model(shipped_model):
    path = shipped_path(DEFAULT_SHIPPED, "codebook")
    codebook = Codebook.load(path)  # also checks the centroids against their fingerprint
    assert (len(codebook.centroids), codebook.dim) == (1024, 128)
    assert codebook.meta["model_fingerprint"] == model_fingerprint(shipped_model)
    assert codebook.model_fingerprint == model_fingerprint(shipped_model)
    check_model(model_fingerprint(shipped_model), codebook.model_fingerprint, "the shipped model", path)
    with pytest.raises(ModelMismatchError, match="other.h5 .model 0123456789abcdef. and .*-1k.npz"):
        check_model("0123456789abcdef", codebook.model_fingerprint, "other.h5", path)
    assert path.stat().st_size < 300_000  # float16 centroids
    with np.load(path, allow_pickle=False) as data:
        assert data["centroids"].dtype == np.float16


def test_shipped_whitening_refuses_another_extractor():
    other_weights = build_model()
    with torch.no_grad():
        next(other_weights.trunk.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="model fingerprint .* differs from the recorded"):
        apply_whitening(other_weights, DEFAULT_SHIPPED)
    assert not other_weights.has_whitening
    with pytest.raises(ValueError, match="learned for efficientnet-lite0 blocks.11.expand dim 128"):
        apply_whitening(build_model(dim=64), DEFAULT_SHIPPED)
    with pytest.raises(ValueError, match="learned for"):
        apply_whitening(build_model(layer="blocks.10.expand"), DEFAULT_SHIPPED)


def test_whitening_file_round_trip_and_bad_files(tmp_path, shipped_model):
    path = tmp_path / "copy.whitening.npz"
    meta = save_whitening(shipped_model, path, "copy", version=3, training={"images": 0})
    assert meta["model_fingerprint"] == model_fingerprint(shipped_model)
    loaded = load_model(str(path))
    assert model_fingerprint(loaded) == meta["model_fingerprint"]
    bad = tmp_path / "bad.whitening.npz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="bad.whitening.npz: not a how-met whitening file"):
        load_model(str(bad))
