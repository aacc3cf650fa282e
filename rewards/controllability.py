"""Dense rewards for controllable generation: a frozen model predicts the control condition back from an image.

A *condition type* knows the per-pixel math of one kind of control (segmentation, edges, depth): how far a
prediction is from the target condition per pixel (what Ctrl-U's reward loss averages), how much two
predictions disagree per pixel (Ctrl-U's uncertainty U), and the per-image controllability metric the papers
report (mIoU, SSIM, RMSE). `ConditionReward` pairs a predictor network with a condition type: `predict(images)`
gives the dense prediction (per-pixel logits or maps) and calling it scores each image against its own target
condition, so it also works wherever a `[B]` reward is expected.

Shapes (B images of H × W):
    segmentation: prediction logits [B, C, H, W]; target long [B, H, W] class indices (`IGNORE_INDEX`: unlabelled)
    edges:        prediction probabilities [B, 1, H, W] in [0, 1]; target [B, 1, H, W] in [0, 1]
    depth:        prediction [B, 1, H, W] (any positive scale); target [B, 1, H, W]

`load_condition_predictor` turns a name into such a predictor: a folder written by the shapes world's
`ConditionPredictor.save_pretrained`, or a transformers semantic-segmentation model (e.g. a SegFormer or
UperNet checkpoint, the paper's choice for ADE20K) or depth-estimation model (e.g. DPT) by folder or hub id,
wrapped so that it takes images in [0, 1] and predicts at their resolution. Any other module with a
`forward(images) -> prediction` can be passed to `ConditionReward` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .base import Reward, RewardError, register_reward

IGNORE_INDEX = 255  # segmentation pixels without a label (ADE20K's convention)
_EPS = 1e-6


class ConditionType:
    """The per-pixel math of one kind of control condition; see the module docstring for shapes."""

    name: str = ""

    def uncertainty(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """[B, H, W] ≥ 0: how much two predictions of the same image's condition disagree, per pixel."""
        raise NotImplementedError

    def pixel_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, H, W] per-pixel loss of the prediction against the target, [B, H, W] bool: pixels that count)."""
        raise NotImplementedError

    def controllability(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B] per-image agreement, higher is better (mIoU, SSIM, or −RMSE on the 0–255 scale)."""
        raise NotImplementedError

    def check(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if prediction.shape[0] != target.shape[0] or prediction.shape[-2:] != target.shape[-2:]:
            raise RewardError(f"{self.name} prediction {tuple(prediction.shape)} and target {tuple(target.shape)} "
                              "differ in batch or size; predict at the target's resolution")


class Segmentation(ConditionType):
    """Class-index maps. U = Σ_classes KL(softmax ĉ2 ‖ softmax ĉ1) per pixel; loss = cross-entropy."""

    name = "segmentation"

    def uncertainty(self, first, second):
        log_p1, log_p2 = F.log_softmax(first.float(), dim=1), F.log_softmax(second.float(), dim=1)
        return (log_p2.exp() * (log_p2 - log_p1)).sum(dim=1)

    def pixel_loss(self, prediction, target):
        self.check(prediction, target)
        target = target.long()
        loss = F.cross_entropy(prediction.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
        return loss, target != IGNORE_INDEX

    def controllability(self, prediction, target):
        """Mean IoU over the classes present in the prediction or the target of each image (labelled pixels)."""
        self.check(prediction, target)
        predicted = prediction.argmax(dim=1)
        labelled = target != IGNORE_INDEX
        scores = []
        for b in range(len(target)):
            p, t = predicted[b][labelled[b]], target[b][labelled[b]]
            classes = torch.unique(torch.cat([p, t]))
            ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in classes]
            scores.append(torch.stack(ious).float().mean() if ious else torch.ones((), device=target.device))
        return torch.stack(scores)


class _Map(ConditionType):
    """One-channel maps compared pixel by pixel: U = |m̂1 − m̂2|, loss = (m̂ − c)²."""

    def normalise(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.float()

    def uncertainty(self, first, second):
        return (self.normalise(first) - self.normalise(second)).abs()[:, 0]

    def pixel_loss(self, prediction, target):
        self.check(prediction, target)
        loss = (self.normalise(prediction) - self.normalise(target)).pow(2)[:, 0]
        return loss, torch.ones_like(loss, dtype=torch.bool)


class Edges(_Map):
    """Edge-probability maps in [0, 1] (HED, line art, or the shapes world's edges); controllability is SSIM."""

    name = "edges"

    def controllability(self, prediction, target):
        from torchmetrics.functional.image import structural_similarity_index_measure

        self.check(prediction, target)
        return structural_similarity_index_measure(prediction.float().clamp(0, 1), target.float(), data_range=1.0,
                                                   reduction="none")


class Depth(_Map):
    """Depth maps, each divided by its own maximum first (relative depth, as monocular depth models predict);
    controllability is −RMSE on the 0–255 scale of the normalised maps (the paper's RMSE, negated)."""

    name = "depth"

    def normalise(self, maps):
        maps = maps.float()
        return maps / maps.flatten(1).amax(dim=1).clamp_min(_EPS).view(-1, 1, 1, 1)

    def controllability(self, prediction, target):
        self.check(prediction, target)
        error = (self.normalise(prediction) - self.normalise(target)) * 255.0
        return -error.pow(2).flatten(1).mean(dim=1).sqrt()


CONDITION_TYPES: dict[str, Callable[[], ConditionType]] = {"segmentation": Segmentation, "edges": Edges,
                                                            "depth": Depth}


def condition_type(name: str) -> ConditionType:
    if name not in CONDITION_TYPES:
        raise RewardError(f"unknown condition type {name!r}; known: {sorted(CONDITION_TYPES)}")
    return CONDITION_TYPES[name]()


class TransformersConditionPredictor(torch.nn.Module):
    """A transformers segmentation or depth model as a condition predictor: images [B, 3, H, W] in [0, 1] are
    resized to the processor's input size and normalised with its mean and std; the prediction (class logits
    [B, C, H, W], or depth [B, 1, H, W]) is resized back to H × W bilinearly."""

    def __init__(self, model: torch.nn.Module, condition: str, size: tuple[int, int] | None,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model, self.kind, self.size = model, condition, size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pixels = images.float()
        if self.size is not None and tuple(pixels.shape[-2:]) != self.size:
            pixels = F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False)
        pixels = ((pixels - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        if self.kind == "segmentation":
            out = self.model(pixel_values=pixels).logits
        else:
            out = self.model(pixel_values=pixels).predicted_depth.unsqueeze(1)
        return F.interpolate(out.float(), size=(height, width), mode="bilinear", align_corners=False)


def _processor_size(processor) -> tuple[int, int] | None:
    """The fixed input size a transformers image processor resizes to, or None (the model takes any size)."""
    size = getattr(processor, "size", None) or getattr(processor, "crop_size", None)
    if size is None:
        return None

    def field(key: str):  # `size` is a dict in older transformers, a SizeDict in newer ones
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if field("height") and field("width"):
        return int(field("height")), int(field("width"))
    if field("shortest_edge"):
        return int(field("shortest_edge")), int(field("shortest_edge"))
    return None


def _processor_statistics(processor) -> tuple[Sequence[float], Sequence[float]]:
    """The processor's normalisation (mean, std); identity when it only rescales to [0, 1] (e.g. GLPN's)."""
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if not getattr(processor, "do_normalize", mean is not None) or mean is None or std is None:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(mean), tuple(std)


def load_condition_predictor(name: str, condition: str | None = None) -> torch.nn.Module:
    """A frozen condition predictor from a folder or hub id (see the module docstring); `condition` is
    checked against what the model predicts, or, for transformers models, says which head to load."""
    folder = Path(name)
    if (folder / "condition_predictor.json").is_file():
        from genalign.worlds.shapes_control import ConditionPredictor

        predictor = ConditionPredictor.from_pretrained(folder)
        if condition is not None and predictor.kind != condition:
            raise RewardError(f"'{folder}' predicts {predictor.kind} but condition is {condition}; pass that "
                              f"kind's predictor or set condition: {predictor.kind}")
        return predictor
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise RewardError(f"'{folder}' holds neither a condition predictor (condition_predictor.json) nor a "
                          "transformers model (config.json); pass the folder a build or save_pretrained wrote")
    if condition is None:
        raise RewardError(f"say which condition '{name}' predicts: condition: segmentation or depth")
    import transformers

    loaders = {"segmentation": transformers.AutoModelForSemanticSegmentation,
               "depth": transformers.AutoModelForDepthEstimation}
    if condition not in loaders:
        raise RewardError(f"transformers has no {condition} model class; wrap your {condition} model in a module "
                          "mapping images in [0, 1] to the prediction and pass it to ConditionReward")
    model = loaders[condition].from_pretrained(name)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
        (mean, std), size = _processor_statistics(processor), _processor_size(processor)
    except (OSError, ValueError):  # a checkpoint without a processor: the ImageNet statistics most use
        mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None
    return TransformersConditionPredictor(model.eval(), condition, size, mean, std)


@register_reward("controllability")
class ConditionReward(Reward):
    """A frozen condition predictor as a reward: `predict(images)` → the dense prediction; calling it with one
    target condition per image gives that image's controllability ([B], higher is better).

    Args:
        predictor: a module mapping images [B, 3, H, W] in [0, 1] to the condition type's prediction, or a
            folder / hub id for `load_condition_predictor` (what a YAML config passes).
        condition: "segmentation", "edges" or "depth" (or a `ConditionType`); may be left out when the
            predictor says what it predicts (its `kind`).
        dtype: run the predictor in this dtype ("float16" to save memory, "float64" for exact comparisons);
            None keeps the one it was loaded in. Images are cast to it, gradients flow back through the cast.
    """

    name = "controllability"
    modality = "image"
    kind = "instance"
    differentiable = True

    def __init__(self, predictor: torch.nn.Module | str, condition: str | ConditionType | None = None,
                 dtype: str | torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(predictor, (str, Path)):
            predictor = load_condition_predictor(str(predictor), getattr(condition, "name", condition))
        if condition is None:
            condition = getattr(predictor, "kind", None)
            if condition is None:
                raise RewardError("this predictor does not say what it predicts; pass condition: segmentation, "
                                  "edges or depth")
        self.condition = condition_type(condition) if isinstance(condition, str) else condition
        predicted = getattr(predictor, "kind", self.condition.name)
        if predicted != self.condition.name:
            raise RewardError(f"the predictor predicts {predicted} but condition is {self.condition.name}; pass "
                              f"a {self.condition.name} model")
        self.predictor = predictor.eval().requires_grad_(False)
        if dtype is not None:
            self.predictor.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The dense prediction of each image's condition (differentiable w.r.t. the images)."""
        self.validate_outputs(images)
        # A half- or double-precision generator decodes in its own dtype; the frozen predictor keeps its own.
        weight = next(self.predictor.parameters())
        return self.predictor(images.to(weight.device, weight.dtype))

    def score(self, images: torch.Tensor, conditions: Sequence[torch.Tensor] | None) -> torch.Tensor:
        if conditions is None:
            raise RewardError(f"'{self.name}' scores each image against its target {self.condition.name} "
                              "condition; pass one target tensor per image as the conditions")
        target = torch.stack([torch.as_tensor(c) for c in conditions]).to(images.device)
        return self.condition.controllability(self.predict(images), target).to(images.device)
