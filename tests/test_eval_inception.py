"""The TF-FID Inception-v3 port: structure, outputs, TF1 resize, weight loading and clear failures."""
import os

import numpy as np
import pytest
import torch
import torchvision

from ssm_tread.eval import INCEPTION_URL, FeatureExtractor, FIDInceptionV3, InceptionFeatures, load_inception
from ssm_tread.eval.inception import DEFAULT_INCEPTION_PATH, BlockB, BlockD, tf1_resize_matrix


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FIDInceptionV3().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):  # keep activations O(1) through the depth
                mod.running_var.uniform_(0.5, 2.0)
                mod.running_mean.uniform_(-0.1, 0.1)
        m.fc.bias.uniform_(-1, 1)
    return m


def test_parameter_names_match_pytorch_fid_layout():
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    ours = FIDInceptionV3().state_dict()
    theirs = tv.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_output_shapes_and_definitions(model):
    captured = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    images = torch.randint(0, 256, (2, 64, 48, 3), dtype=torch.uint8)
    extractor = InceptionFeatures(model=model, device="cpu")
    assert isinstance(extractor, FeatureExtractor)
    out = extractor.features(images.numpy())
    hook.remove()
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7)
    assert out["logits"].shape == (2, 1008)
    expected_spatial = captured[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # NHWC flattening as TF
    assert torch.allclose(out["spatial"], expected_spatial)
    assert torch.allclose(out["logits"], out["pool"] @ model.fc.weight.T, atol=1e-5)  # no bias, as ADM
    assert (out["pool"] >= 0).all() and torch.isfinite(out["pool"]).all()


def test_tf1_resize_matrix():
    m = tf1_resize_matrix(256, 299).double().numpy()
    for i in [0, 1, 150, 297, 298]:
        src = i * 256 / 299
        lo = int(np.floor(src))
        row = np.zeros(256)
        row[lo] += 1 - (src - lo)
        row[min(lo + 1, 255)] += src - lo
        assert np.allclose(m[i], row, atol=1e-5)
    assert torch.equal(tf1_resize_matrix(299, 299), torch.eye(299))
    assert np.allclose(m.sum(1), 1)


def test_resize_and_scaling_of_constant_image(model):
    captured = []
    hook = model.Conv2d_1a_3x3.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model(torch.full((1, 3, 256, 256), 192.0))
    hook.remove()
    assert captured[0].shape == (1, 3, 299, 299) and torch.allclose(captured[0], torch.tensor(0.5))


@pytest.mark.parametrize("ours,theirs,cin,size", [(BlockB, torchvision.models.inception.InceptionB, 288, 35),
                                                  (BlockD, torchvision.models.inception.InceptionD, 768, 17)])
def test_reduction_blocks_match_torchvision(ours, theirs, cin, size):
    torch.manual_seed(0)
    a, b = ours(cin).eval(), theirs(cin).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, cin, size, size)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_load_weights_round_trip(model, tmp_path):
    path = tmp_path / "pt_inception.pth"
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    loaded = load_inception(str(path))
    x = torch.rand(1, 3, 80, 80) * 255
    with torch.no_grad():
        assert torch.allclose(loaded(x)["pool"], model(x)["pool"])
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(ValueError, match="pytorch-fid"):
        load_inception(str(path))


def test_missing_weights_message(tmp_path):
    path = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError) as e:
        load_inception(path)
    assert INCEPTION_URL in str(e.value) and path in str(e.value)


def test_rejects_non_uint8(model):
    with pytest.raises(ValueError, match="uint8"):
        InceptionFeatures(model=model, device="cpu").features(np.zeros((1, 32, 32, 3), np.float32))


REAL_WEIGHTS = os.environ.get("SSM_TREAD_INCEPTION", DEFAULT_INCEPTION_PATH)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(REAL_WEIGHTS), reason=f"FID Inception weights absent ({REAL_WEIGHTS})")
def test_real_weights():
    extractor = InceptionFeatures(REAL_WEIGHTS)
    rng = np.random.default_rng(0)
    images = np.repeat(np.repeat(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 32, 1), 32, 2)  # [4, 256, 256, 3]
    out = extractor.features(images)
    assert out["pool"].shape == (4, 2048) and (out["pool"] >= 0).all() and torch.isfinite(out["logits"]).all()
    probs = out["logits"].softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(4))
    again = extractor.features(images[::-1].copy())
    assert torch.allclose(again["pool"].flip(0), out["pool"], atol=1e-4)  # batch-independent


def test_features_equal_torch_fidelitys_extractor(model, tmp_path):
    """torch-fidelity's FeatureExtractorInceptionV3, an independent port of the same TF graph (its own TF1
    resize, blocks and pools), loads our state dict strictly and gives the same features."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.save(model.state_dict(), tmp_path / "inception.pt")
    theirs = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                  feature_extractor_weights_path=str(tmp_path / "inception.pt"))
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        pool, logits = theirs.eval()(images)
    ours = InceptionFeatures(model=model, device="cpu").features(images.permute(0, 2, 3, 1).numpy())
    torch.testing.assert_close(ours["pool"], pool, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["logits"], logits, rtol=1e-5, atol=1e-5)
