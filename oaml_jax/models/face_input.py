"""The model input contract: what a face is before the network sees it, owned here and nowhere else.

Everything outside the network (the training pipeline, evaluation, `FaceModel`, exported models) hands
faces over as **uint8 RGB `[N, 112, 112, 3]`**, aligned so that the five landmarks (eyes, nose tip,
mouth corners) fall on `ARCFACE_TEMPLATE`. `InputContract.preprocess` turns that into the network's
float input on the device: channels reversed for models that take BGR (AdaFace's published weights and
every model trained with `model.input_channel_order="BGR"`), then `(x / 255 - 0.5) / 0.5`, as insightface
and AdaFace normalize. Shipping uint8 moves a quarter of float32's bytes from host to device, and XLA fuses
the mapping into the first convolution.

The contract also fixes the side of the feature map that QAConv matches and the occlusion head predicts
(`grid`): 112 halved once per backbone stage up to `model.feature_stage`.

This module imports numpy and jax.numpy only, so the data pipeline can use its constants.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FACE_SIZE = 112
FACE_SHAPE = (FACE_SIZE, FACE_SIZE, 3)
NUM_STAGES = 4
CHANNEL_ORDERS = ("BGR", "RGB")

# The five reference landmarks of an aligned 112x112 face, (x, y) in pixels: left eye, right eye, nose
# tip, left mouth corner, right mouth corner, "left" meaning image left (the subject's right eye comes
# first). The ArcFace/insightface template.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64)


def grid_size(feature_stage: int) -> int:
    """Side of the feature map of backbone stage `feature_stage` (1..4): 112 / 2**stage (4 -> 7).

    Raises:
        ValueError: `feature_stage` is not one of 1..4 (the field `model.feature_stage`).
    """
    if feature_stage not in range(1, NUM_STAGES + 1):
        raise ValueError(f"model.feature_stage={feature_stage!r}; expected one of "
                         f"{tuple(range(1, NUM_STAGES + 1))}")
    return FACE_SIZE // 2 ** feature_stage


def check_faces(images: np.ndarray, field: str = "images") -> np.ndarray:
    """Checks a host batch of faces against the contract and returns it as a numpy array.

    Args:
        images: uint8 RGB `[N, 112, 112, 3]`.
        field: the name used in the error message.

    Raises:
        ValueError: another dtype, rank or size, or no image.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != FACE_SHAPE:
        raise ValueError(f"{field}: expected aligned faces, uint8 RGB [N, {FACE_SIZE}, {FACE_SIZE}, 3], got "
                         f"{images.dtype} {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{field}: expected at least one image")
    return images


@dataclasses.dataclass(frozen=True)
class InputContract:
    """How a model takes its faces.

    Attributes:
        channel_order: the network's channel order, "BGR" or "RGB" (inputs are always RGB uint8).
        grid: side of the feature / visibility maps (7 for stage 4).
    """

    channel_order: str = "BGR"
    grid: int = 7

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"model.input_channel_order={self.channel_order!r}; expected one of "
                             f"{CHANNEL_ORDERS}")
        if self.grid not in tuple(grid_size(s) for s in range(1, NUM_STAGES + 1)):
            raise ValueError(f"grid={self.grid}: not the side of any backbone stage's feature map")

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 RGB `[..., 112, 112, 3]` -> the network's float32 input (BGR if the model takes it).

        Raises:
            TypeError: `images` is not uint8 (a float image would be normalized twice).
        """
        if images.dtype != jnp.uint8:
            raise TypeError(f"model input must be uint8 RGB pixels [N, {FACE_SIZE}, {FACE_SIZE}, 3], got "
                            f"{images.dtype}")
        x = images.astype(jnp.float32)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        return (x - 127.5) / 127.5

    def to_json(self) -> dict:
        return {"channel_order": self.channel_order, "grid": self.grid}
