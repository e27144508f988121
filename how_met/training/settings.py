"""Training settings: the HOW ECCV'20 recipe (SPEC section 2) and the Met paper's synthetic
positives (its Appendix A.1). Light on purpose (no torch): the command line builds its options
from these defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

# The Met paper's augmentation of a synthetic pair: a random crop of this area fraction, resized
# to the training size, colour jitter with this probability, grayscale with this probability.
CROP_SCALE: Tuple[float, float] = (0.7, 1.0)
CROP_RATIO: Tuple[float, float] = (3 / 4, 4 / 3)   # aspect change of the crop (log-uniform)
JITTER_P = 0.8
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
GRAYSCALE_P = 0.2
# Synthetic validation queries (when the data has no validation split): harder than the training
# crops, so that the validation GAP is not saturated by what the model was trained on.
VAL_CROP_SCALE: Tuple[float, float] = (0.35, 0.7)
VAL_DISTRACTOR_FRACTION = 0.25   # held-out images whose originals stay out of the validation database


@dataclass
class TrainingSettings:
    """What a training run does. Defaults: the HOW ECCV'20 recipe (SPEC section 2)."""

    epochs: int = 20
    tuples_per_epoch: int = 2000
    pool_size: int = 20000              # images hard negatives are mined from, redrawn every epoch
    negatives: int = 5
    tuples_per_step: int = 5            # tuples whose gradients are summed per Adam step
    lr: float = 5e-6                    # the R18 rate
    weight_decay: float = 1e-4
    lr_decay: float = 0.99              # per epoch
    margin: float = 0.8                 # contrastive loss
    image_size: Optional[int] = None    # longer side of training images; None: the extraction config's
    val_images: int = 200               # held-out images of a synthetic validation set (0: no validation)
    seed: int = 0

    def run_identity(self) -> dict:
        """What makes a saved training state another run if changed (``epochs`` may grow on resume)."""
        return {k: v for k, v in asdict(self).items() if k != "epochs"}

    def check(self) -> "TrainingSettings":
        for name in ("epochs", "tuples_per_epoch", "pool_size", "negatives", "tuples_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"training setting {name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and self.margin > 0 and 0 < self.lr_decay <= 1 and self.weight_decay >= 0):
            raise ValueError(f"training settings need lr > 0, margin > 0, 0 < lr_decay <= 1, weight_decay >= 0 "
                             f"(got {self.lr}, {self.margin}, {self.lr_decay}, {self.weight_decay})")
        if self.image_size is not None and not 32 <= self.image_size <= 4096:
            raise ValueError(f"training image size must be in [32, 4096], got {self.image_size}")
        if self.val_images < 0:
            raise ValueError(f"val_images must be >= 0, got {self.val_images}")
        return self
