"""AnomalyDINO's per-category preprocessing presets, "agnostic" and "informed".

The choices for MVTec-AD and VisA are those of ``get_dataset_info`` in the official
AnomalyDINO code (github.com/dammsi/AnomalyDINO, ``src/utils.py``):

* Masking is the same in both presets. On MVTec-AD only capsule, hazelnut, pill,
  screw and toothbrush are masked, and on VisA every category is.
* "agnostic" adds the 8 rotations (0, 45, ..., 315 degrees) of every reference
  image to the memory bank, for every category.
* "informed" rotates only where test objects appear in varying orientations. On
  MVTec-AD these are hazelnut and screw, and on VisA there are none.

Reference images are never masked in either preset: the official code passes
``mask_ref_images=False``, so the memory bank holds every reference patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .data import ELPV_CATEGORIES
from .visa import MVTEC_CATEGORIES, MVTEC_MASKED, VISA_CATEGORIES

PresetName = Literal["agnostic", "informed"]
PRESETS = ("agnostic", "informed")
INFORMED_ROTATED = {"mvtec_ad": ("hazelnut", "screw"), "visa": (), "elpv": ()}
_CATEGORIES = {"mvtec_ad": MVTEC_CATEGORIES, "visa": VISA_CATEGORIES, "elpv": ELPV_CATEGORIES}


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing choices for one category.

    Attributes
    ----------
    rotate_references : bool
        Add 8 rotated views of each reference image to the memory bank.
    mask_test_images : bool
        Give test images the PCA foreground mask of :mod:`adlib.masking`, so that
        background patches score 0.
    mask_references : bool
        Mask the reference images too. False in both presets, as in the official code.
    """

    rotate_references: bool
    mask_test_images: bool
    mask_references: bool = False


def preprocessing_for(dataset: str, category: str, *, preset: PresetName = "agnostic") -> Preprocessing:
    """Return the preprocessing of ``category`` under ``preset``.

    Parameters
    ----------
    dataset : {"mvtec_ad", "visa", "elpv"}
    category : str
    preset : {"agnostic", "informed"}, default="agnostic"

    Raises
    ------
    ValueError
        If ``preset``, ``dataset`` or ``category`` is unknown.

    Examples
    --------
    >>> preprocessing_for("mvtec_ad", "screw", preset="informed")
    Preprocessing(rotate_references=True, mask_test_images=True, mask_references=False)
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; expected one of {', '.join(PRESETS)}.")
    if dataset not in _CATEGORIES:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of {', '.join(_CATEGORIES)}.")
    if category not in _CATEGORIES[dataset]:
        raise ValueError(f"Unknown {dataset} category {category!r}; expected one of "
                         f"{', '.join(_CATEGORIES[dataset])}.")
    # NOTE: the official code has no ELPV presets. ELPV cells fill the whole image,
    # so they are never masked, and they are rotated only under "agnostic".
    masked = dataset == "visa" or (dataset == "mvtec_ad" and category in MVTEC_MASKED)
    rotated = preset == "agnostic" or category in INFORMED_ROTATED[dataset]
    return Preprocessing(rotate_references=rotated, mask_test_images=masked)
