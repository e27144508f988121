"""Write the shipped unsupervised parts (codebooks/README.md) from the corpus features of the
lever cache (cache.py corpus ...): the corpus PCA-whitening of the reduction layer and the
seed-0 1,024-word corpus codebook -- the ones measured by run.py --white corpus --cb corpus.

    HOW_MET_LEVERS_CACHE=/tmp/obj python eval/levers/ship.py
"""
import json

import h5py

from how_met.asmk.codebook import Codebook
from how_met.features.checkpoints import build_model
from how_met.features.network import model_fingerprint
from how_met.features.settings import DEFAULT_SHIPPED, SHIPPED_MODELS, default_config, shipped_path, store_config
from how_met.features.shipped import load_shipped_model, save_whitening

from run import OBJ, corpus_codebook, corpus_keys, corpus_whitening


def main():
    name = DEFAULT_SHIPPED
    with h5py.File(OBJ / "corpus.h5", "r") as h5:
        n_images = len(corpus_keys(h5))
    assert n_images == SHIPPED_MODELS[name]["training_images"], "update SHIPPED_MODELS"
    config = default_config()
    model = build_model(**config["model"])
    model.set_whitening(*corpus_whitening())
    whitening = shipped_path(name, "whitening")
    save_whitening(model, whitening, name, version=1, training={
        "images": n_images, "source": "../shared/data/corpus (list.json there: provenance)",
        "features": "the 1000 strongest of scales [1, 0.707, 0.5] per image, images <= 500 px",
        "made_by": "eval/levers/cache.py corpus + eval/levers/ship.py"})
    fingerprint = model_fingerprint(load_shipped_model(whitening))
    codebook = Codebook.load(corpus_codebook(1024, 0))
    # On corpus images (<= 500 px) the default config uses no upscale: it is what made them.
    codebook.meta.update({"model_fingerprint": fingerprint, "shipped_model": name,
                          "extractor": store_config(model, config),
                          "training_set": {"source": "../shared/data/corpus", "images": n_images,
                                           "per_image": 300, "descriptors": 300 * n_images}})
    path = codebook.save(shipped_path(name, "codebook"), float16=True)
    print(json.dumps({"whitening": str(whitening), "bytes": whitening.stat().st_size,
                      "model_fingerprint": fingerprint, "codebook": str(path), "codebook_bytes": path.stat().st_size,
                      "codebook_fingerprint": codebook.fingerprint}, indent=1))


if __name__ == "__main__":
    main()
