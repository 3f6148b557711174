"""The digits pipeline: 8×8 images (arrays or image files) in, digits out; accuracy of a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import digits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
FORMS = ("an 8×8 image: an image file, 64 numbers (pixel counts 0-16, or values in 0-1) or an "
         "(8, 8) array")


@dataclass
class Digit(Result):
    input: str  # the file, or "array"
    label: str  # the digit
    probability: float
    probabilities: dict[str, float]

    def __str__(self) -> str:
        return f"{self.label} ({self.probability:.3f})  {self.input}"


def image_from_file(path: Path) -> Tensor:
    """An image file as an 8×8 digit in [0, 1], ink bright on a dark ground as in the training
    set: greyscale, shrunk by area averaging, inverted when the ground is light."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None
    pixels = torch.tensor(np.asarray(grey, dtype=np.float32)) / 255.0  # (8, 8)
    border = torch.cat((pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]))
    return 1.0 - pixels if float(border.mean()) > 0.5 else pixels


def image_from_array(value: Any, name: str) -> Tensor:
    """An (8, 8) array or 64 numbers as a digit in [0, 1]: pixel counts 0–16 (integers, or any
    value above 1) are divided by 16, as training divided scikit-learn's images."""
    try:
        array = torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError):
        raise InputError(f"{name} is not {FORMS}") from None
    if array.numel() != 64:
        raise InputError(f"{name} has {array.numel()} values, not {FORMS}")
    if not bool(torch.isfinite(array).all()) or float(array.min()) < 0 or float(array.max()) > 16:
        raise InputError(f"{name}: pixel values must be in 0-16 (counts) or 0-1")
    integral = np.issubdtype(np.asarray(value).dtype, np.integer)
    return array.view(8, 8) / (16.0 if integral or float(array.max()) > 1 else 1.0)


class DigitsPipeline(Pipeline):
    """Input: an image file, an (8, 8) array / nested list, or a line of 64 numbers.
    Result: :class:`Digit`."""

    task = digits.NAME

    def _load(self) -> nn.Module:
        model, self.data, _ = digits.load_model(self.checkpoint)
        return model

    def _is_single(self, inputs: Any) -> bool:
        if isinstance(inputs, (str, Path)):
            return True
        if isinstance(inputs, (Tensor, np.ndarray)):
            return inputs.ndim <= 2
        # 64 numbers, or 8 rows of 8 numbers, are one image; any other list is several inputs
        if not isinstance(inputs, (list, tuple)):
            return True
        if all(isinstance(v, (int, float)) for v in inputs):
            return True
        return len(inputs) == 8 and all(
            isinstance(row, (list, tuple)) and len(row) == 8 and
            all(isinstance(v, (int, float)) for v in row) for row in inputs)

    def parse(self, line: str) -> Any:
        fields = line.replace(",", " ").split()
        if len(fields) >= 8 and all(_is_number(f) for f in fields):
            # (int only where int() reads it: "nan", "inf" and "1e3" are floats without a ".")
            return [int(f) if f.lstrip("+-").isdigit() else float(f) for f in fields]
        return line

    def image(self, value: Any, index: int) -> tuple[Tensor, str]:
        name = f"input {index}"
        if isinstance(value, (str, Path)):
            path = Path(value)
            if path.is_file():
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    raise InputError(f"{path} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
                return image_from_file(path), str(path)
            raise InputError(f"{name} ({shown(value)}) is not {FORMS}"
                             + ("; no such file" if path.suffix.lower() in IMAGE_SUFFIXES else ""))
        return image_from_array(value, name), "array"

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        images, names = [], []
        for i, value in enumerate(batch):
            image, name = self.image(value, first_index + i + 1)
            images.append(image)
            names.append(name)
        logits = self.module(digits.to_sequence(torch.stack(images).to(self.device),
                                                self.data.reader))  # (B, 10)
        results: list[Result] = []
        for name, row in zip(names, logits.softmax(-1).tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            results.append(Digit(name, str(best), row[best], {str(d): p for d, p in enumerate(row)}))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Loss and accuracy on a file in the UCI optdigits layout (64 pixel counts and the
        digit per line; scikit-learn's bundled set is ``optdigits.tes``)."""
        images, labels = digits.read_optdigits(path)
        references, predictions, loss = digits.predict_images(
            self.module, images, labels, self.data.reader, batch_size or self.data.eval_batch_size)
        return {"loss": loss, "accuracy": digits.accuracy(references, predictions),
                "examples": float(len(references))}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        return (f"accuracy {100 * metrics['accuracy']:.2f}%, loss {metrics['loss']:.4f} "
                f"({int(metrics['examples'])} images)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
