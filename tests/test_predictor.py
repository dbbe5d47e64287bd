"""Predictor: the HTTP service's predictions in Python, on tiny real checkpoints loaded by name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marketplace_reco.data.errors import CorruptImageError, ImageTooLargeError
from marketplace_reco.data.text import TextPreprocessor
from marketplace_reco.models import create_model, load_model
from marketplace_reco.serving import ModelOutputError, Prediction, Predictor, PredictorInputError
from marketplace_reco.training.hog_svm import fit

CLASSES = ["Electronics", "Fashion", "Home & Garden"]
VOCABULARY = ["<pad>", "<unk>", "phone", "charger", "dress", "sofa", "tabl"]


def _photo(color: tuple[int, int, int], stripes: str = "none") -> Image.Image:
    """A photo whose edges (what HOG sees) depend on ``stripes``: "horizontal", "vertical" or "none"."""
    image = Image.new("RGB", (80, 60), color)
    for offset in range(0, 80, 8):
        if stripes == "vertical":
            image.paste((0, 0, 0), (offset, 0, offset + 4, 60))
        elif stripes == "horizontal":
            image.paste((0, 0, 0), (0, offset, 80, offset + 4))
    return image


def overflowing_image_classifier(classes: list[str]) -> torch.nn.Module:
    """An image classifier with finite weights whose logits overflow: its probabilities are nan for any photo."""
    model = create_model("image-classifier", classes=classes, backbone="test_resnet", preprocessing={"image_size": 32},
                         feature_dim=8)
    with torch.no_grad():  # every feature is 1, every logit 8 x 3e38 + 3e38 = inf, so softmax gives nan
        model.feature[0].weight.zero_()
        model.feature[0].bias.fill_(1.0)
        model.head[1].weight.fill_(3e38)
        model.head[1].bias.fill_(3e38)
    return model


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")  # lossless, so bytes, path and PIL inputs decode to the very same pixels
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    # A few seconds of real training, so that predictions depend on the photo.
    photos = [_photo(color, stripes) for stripes in ("horizontal", "vertical", "none")
              for color in ((200, 50, 50), (50, 200, 50))]
    hog = create_model("hog-svm", classes=CLASSES)
    fit(hog, hog.extract_features(photos), [0, 0, 1, 1, 2, 2]).save_pretrained(folder / "hog-svm")
    text = create_model("text-cnn", classes=CLASSES, vocabulary=VOCABULARY,
                        preprocessing=TextPreprocessor().to_config(), embedding_dim=8, max_length=16,
                        kernel_sizes=[1, 2], num_filters=4, feature_dim=8)
    text.save_pretrained(folder / "text-cnn")
    create_model("word2vec", vocabulary=VOCABULARY, preprocessing=TextPreprocessor().to_config(),
                 dim=4).save_pretrained(folder / "word2vec")
    return folder


@pytest.fixture
def named(checkpoints: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Model names resolve in the test's checkpoints folder."""
    monkeypatch.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
    return checkpoints


def test_loads_by_name_with_the_checkpoints_revision(named: Path) -> None:
    predictor = Predictor.from_pretrained("hog-svm")
    assert predictor.name == "hog-svm" and predictor.classes == CLASSES
    assert predictor.revision == load_model("hog-svm").source["revision"] != ""
    assert predictor.input_kind == "image" and predictor.takes_images and not predictor.takes_texts
    described = predictor.describe()
    assert described["model_type"] == "hog-svm" and described["preprocessing"]["resize"] == "letterbox"


def test_a_photo_as_pil_path_or_bytes_gives_the_same_prediction(named: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_pretrained("hog-svm")
    assert predictor.predict(image=_photo((90, 90, 200), "vertical")).pred == "Fashion"
    photo = _photo((200, 40, 40), "horizontal")
    path = tmp_path / "photo.png"
    path.write_bytes(_png(photo))
    predictions = [predictor.predict(image=source) for source in (photo, path, str(path), _png(photo))]
    assert all(prediction == predictions[0] for prediction in predictions)
    assert predictions[0].pred == "Electronics"


def test_prediction_ranks_every_class_by_the_models_probabilities(named: Path) -> None:
    predictor = Predictor.from_pretrained("text-cnn")
    text = "phone charger, barely used"
    prediction = predictor.predict(text=text)
    proba = load_model("text-cnn").predict_proba(texts=[text])[0]
    assert isinstance(prediction, Prediction)
    assert prediction.pred == CLASSES[int(np.argmax(proba))] == prediction.classes[0]
    assert sorted(prediction.classes) == CLASSES
    assert list(prediction.probabilities) == prediction.classes
    assert [prediction.probabilities[c] for c in CLASSES] == pytest.approx(proba.tolist(), abs=1e-6)
    assert np.all(np.diff(list(prediction.probabilities.values())) <= 0)
    assert (prediction.model, prediction.revision) == ("text-cnn", predictor.revision)


def test_batch_equals_one_at_a_time(named: Path) -> None:
    predictor = Predictor.from_pretrained("text-cnn")
    texts = ["phone charger", "red dress", "sofa and table"]
    batch = predictor.predict_batch(texts=texts)
    assert [p.pred for p in batch] == [predictor.predict(text=t).pred for t in texts]
    assert [p.probabilities for p in batch] == [pytest.approx(predictor.predict(text=t).probabilities, abs=1e-6)
                                                for t in texts]


def test_known_tokens_and_the_warning_when_no_word_is_known(named: Path) -> None:
    predictor = Predictor.from_pretrained("text-cnn")
    known = predictor.predict(text="Phone with charger")
    assert known.known_tokens == 2 and known.warning is None
    unknown = predictor.predict(text="zzz qqq")
    assert unknown.known_tokens == 0
    assert "no word of the text is known" in unknown.warning
    assert Predictor.from_pretrained("hog-svm").predict(image=_photo((1, 2, 3))).known_tokens is None


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    ("hog-svm", {}, "needs an image"),
    ("hog-svm", {"image": _photo((9, 9, 9)), "text": "a phone"}, "does not take texts"),
    ("text-cnn", {"text": "   "}, "text 0 is empty"),
    ("text-cnn", {"image": _photo((9, 9, 9)), "text": "a phone"}, "does not take images"),
])
def test_inputs_that_do_not_fit_the_model(named: Path, model: str, kwargs: dict, message: str) -> None:
    with pytest.raises(PredictorInputError, match=message):
        Predictor.from_pretrained(model).predict(**kwargs)


def test_listings_are_checked_before_anything_runs(named: Path) -> None:
    predictor = Predictor.from_pretrained("text-cnn")
    with pytest.raises(PredictorInputError, match="does not take images"):
        predictor.check_listings([1, 1], ["a", "b"])
    with pytest.raises(PredictorInputError, match="needs a text"):
        predictor.check_listings([], [])
    photos = Predictor.from_pretrained("hog-svm")
    with pytest.raises(PredictorInputError, match="needs an image"):
        photos.check_listings([2, 0], None)


def test_a_listing_s_photos_count_together(named: Path) -> None:
    predictor = Predictor.from_pretrained("hog-svm")
    first, second = _photo((200, 50, 50), "horizontal"), _photo((50, 200, 50), "vertical")
    together = predictor.predict(image=[first, second])
    alone = [predictor.predict(image=photo) for photo in (first, second)]
    for name, probability in together.probabilities.items():
        assert probability == pytest.approx((alone[0].probabilities[name] + alone[1].probabilities[name]) / 2)


def test_bad_photos_raise_the_data_layers_errors(named: Path) -> None:
    with pytest.raises(CorruptImageError):
        Predictor.from_pretrained("hog-svm").predict(image=b"not a photo")
    tiny_limit = Predictor(load_model("hog-svm"), max_image_pixels=100)
    with pytest.raises(ImageTooLargeError):
        tiny_limit.predict(image=_photo((1, 2, 3)))


def test_only_classifiers_make_predictors(named: Path) -> None:
    with pytest.raises(PredictorInputError, match="not a classifier"):
        Predictor.from_pretrained("word2vec")


def test_probabilities_that_are_not_finite_are_refused_not_returned() -> None:
    predictor = Predictor(overflowing_image_classifier(CLASSES), name="overflowing")
    assert all(torch.isfinite(parameter).all() for parameter in predictor.model.parameters())
    with pytest.raises(ModelOutputError, match=r"'overflowing' .* not finite numbers for 2 of its 2 inputs"):
        predictor.predict_batch(images=[_photo((9, 9, 9)), _photo((200, 9, 9))])
