"""DenseCRF refinement of MaskCut masks with CutLER's settings (`maskcut/crf.py`), behind the `crf` extra.

`pip install 'crate_jax[crf]'` installs `pydensecrf2` (the maintained fork; it builds from source in
about a minute; the original `pydensecrf` fails under Cython 3). Without it `available()` is False and
callers report "no CRF".

`refine(image, mask)`: unary `−log softmax([1 − m, m])` of the mask, a Gaussian pairwise term (sxy 3, compat
7) and a bilateral one (sxy 50, srgb 5, compat 10), 10 mean-field iterations, the arg-max label, holes
filled. CutLER discards the refined mask (returns None here) when its IoU with the input is below 0.5.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from crate_jax.analysis.cutler import mask_iou

MAX_ITER = 10
POS_XY_STD, POS_W = 3, 7
BI_XY_STD, BI_RGB_STD, BI_W = 50, 5, 10
MIN_IOU = 0.5
INSTALL_HINT = "pip install 'crate_jax[crf]' (pydensecrf2, builds from source in about a minute)"


def available() -> bool:
    """True when `pydensecrf2` (module `pydensecrf`) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError:
        return False
    return True


def crf_labels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The CRF's arg-max foreground `bool [H, W]` for `image uint8 [H, W, 3]` and `mask bool [H, W]`."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image = np.ascontiguousarray(np.asarray(image, np.uint8)[..., :3])
    h, w = mask.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    logits = np.stack([1.0 - mask, mask.astype(np.float64)])  # CutLER: softmax over (bg, fg) logits
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=POS_XY_STD, compat=POS_W)
    crf.addPairwiseBilateral(sxy=BI_XY_STD, srgb=BI_RGB_STD, rgbim=image, compat=BI_W)
    q = np.asarray(crf.inference(MAX_ITER)).reshape(2, h, w)
    return np.argmax(q, axis=0).astype(bool)


def refine(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """CutLER's post-processing of one mask: CRF, holes filled; None when the result's IoU with `mask` is
    below 0.5 (the mask is discarded)."""
    mask = np.asarray(mask, bool)
    out = scipy.ndimage.binary_fill_holes(crf_labels(image, mask))
    return None if mask_iou(mask, out) < MIN_IOU else out
