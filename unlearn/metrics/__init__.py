"""Evaluation metrics: CLIP score / accuracy / directional score, CLIP-feature FID, NudeNet counts, prompt sets."""

from unlearn.metrics.clip_metrics import CLIPAccuracy, CLIPScore, CLIPTopOne, DirectionalCLIP
from unlearn.metrics.clip_model import ClipEncoder, PreprocessSettings, load_preprocess_settings
from unlearn.metrics.fid import ClipFeatureExtractor, make_fid
from unlearn.metrics.i2p import I2P_SAMPLE, I2PPrompt, read_i2p
from unlearn.metrics.nudenet import EXPOSED_CLASSES, NudeNetCounter, images_to_bgr, reduction_percent
from unlearn.metrics.templates import IMAGENET_TEMPLATES, expand

__all__ = [
    "EXPOSED_CLASSES",
    "I2P_SAMPLE",
    "IMAGENET_TEMPLATES",
    "CLIPAccuracy",
    "CLIPScore",
    "CLIPTopOne",
    "ClipEncoder",
    "ClipFeatureExtractor",
    "DirectionalCLIP",
    "I2PPrompt",
    "NudeNetCounter",
    "PreprocessSettings",
    "expand",
    "images_to_bgr",
    "load_preprocess_settings",
    "make_fid",
    "read_i2p",
    "reduction_percent",
]
