"""Public condition predictors through the `controllability` reward: tiny transformers segmentation and depth
models saved here in their hub layout, loaded the way a config names a hub id, and checked against the
preprocessing their image processors prescribe."""

import pytest
import torch
import torch.nn.functional as F

from rewards import build_reward
from rewards.base import RewardError

MEAN, STD, SIZE = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 48


def _segformer(folder, *, with_processor=True):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=6, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                             hidden_sizes=[8, 16], num_attention_heads=[1, 2], decoder_hidden_size=16,
                             patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    if with_processor:
        SegformerImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=MEAN,
                                image_std=STD).save_pretrained(folder)
    return model


def _glpn(folder):
    from transformers import GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessor

    torch.manual_seed(1)
    config = GLPNConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                        num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                        decoder_hidden_size=16, head_in_index=-1)
    model = GLPNForDepthEstimation(config).eval()
    model.save_pretrained(folder)
    GLPNImageProcessor().save_pretrained(folder)
    return model


def _expected(model, images, size, mean, std, head):
    pixels = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False) if size else images
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = head(model(pixel_values=pixels))
    return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)


def test_a_transformers_segmentation_model_predicts_with_its_processors_size_and_statistics(tmp_path):
    """Fails if the processor's size or normalisation is ignored, the logits are not resized back to the image,
    or the prediction is not differentiable in the image (Ctrl-U backpropagates through it)."""
    model = _segformer(tmp_path / "segformer")
    reward = build_reward("controllability", predictor=str(tmp_path / "segformer"), condition="segmentation")
    images = torch.rand(2, 3, 32, 32)
    prediction = reward.predict(images)
    assert prediction.shape == (2, 6, 32, 32)
    expected = _expected(model, images, SIZE, MEAN, STD, lambda out: out.logits)
    torch.testing.assert_close(prediction, expected, rtol=1e-5, atol=1e-6)

    target = torch.randint(0, 6, (2, 32, 32))
    scores = reward(images, list(target)).rewards
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()  # mIoU
    images.requires_grad_(True)
    reward.predict(images).logsumexp(1).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_a_checkpoint_without_a_processor_uses_imagenet_statistics_at_the_image_size(tmp_path):
    model = _segformer(tmp_path / "bare", with_processor=False)
    reward = build_reward("controllability", predictor=str(tmp_path / "bare"), condition="segmentation")
    images = torch.rand(1, 3, 32, 32)
    expected = _expected(model, images, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), lambda o: o.logits)
    torch.testing.assert_close(reward.predict(images), expected, rtol=1e-5, atol=1e-6)


def test_a_transformers_depth_model_predicts_one_channel_maps(tmp_path):
    model = _glpn(tmp_path / "glpn")
    reward = build_reward("controllability", predictor=str(tmp_path / "glpn"), condition="depth")
    images = torch.rand(2, 3, 32, 32)
    prediction = reward.predict(images)
    assert prediction.shape == (2, 1, 32, 32)
    # GLPN's processor only rescales to [0, 1] (no mean/std) and keeps the input size.
    expected = _expected(model, images, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                         lambda out: out.predicted_depth.unsqueeze(1))
    torch.testing.assert_close(prediction, expected, rtol=1e-5, atol=1e-6)


def test_public_predictor_errors_name_the_fix(tmp_path):
    _segformer(tmp_path / "segformer")
    with pytest.raises(RewardError, match="say which condition"):
        build_reward("controllability", predictor=str(tmp_path / "segformer"))
    with pytest.raises(RewardError, match="no edges model class"):
        build_reward("controllability", predictor=str(tmp_path / "segformer"), condition="edges")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="neither a condition predictor"):
        build_reward("controllability", predictor=str(tmp_path / "empty"), condition="depth")
