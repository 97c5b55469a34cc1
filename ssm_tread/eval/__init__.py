"""Evaluation: Frechet distance and the ADM suite (TF-FID Inception port), and the digits evaluator."""
from .adm import NpzImages, evaluate_npz, summary_line
from .digits import DigitsClassifier, DigitsEvaluator, DigitsFeatures, load_digits_classifier, train_digits_classifier
from .features import FeatureExtractor, compute_features
from .inception import DEFAULT_INCEPTION_PATH, INCEPTION_URL, FIDInceptionV3, InceptionFeatures, load_inception
from .metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    inception_score,
    manifold_radii,
    precision_recall,
)

__all__ = ["DEFAULT_INCEPTION_PATH", "INCEPTION_URL", "DigitsClassifier", "DigitsEvaluator", "DigitsFeatures",
           "FIDInceptionV3", "FeatureExtractor", "InceptionFeatures", "NpzImages", "compute_features",
           "evaluate_npz", "feature_statistics", "frechet_distance", "frechet_distance_of", "inception_score",
           "load_digits_classifier", "load_inception", "manifold_radii", "precision_recall", "summary_line",
           "train_digits_classifier"]
