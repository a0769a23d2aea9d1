import pytest
import torch
import torchvision

from pipeline import models as M
from pipeline.errors import ArchitectureError

from .conftest import make_model


@pytest.mark.parametrize(("arch", "head"), [
    ("resnet18", "fc"),
    ("mobilenet_v3_small", "classifier.3"),
    ("mobilenet_v2", "classifier.1"),
    ("efficientnet_b0", "classifier.1"),
    ("convnext_tiny", "classifier.2"),
    ("vgg11", "classifier.6"),
    ("vit_b_16", "heads.head"),
    ("inception_v3", "fc"),
])
def test_find_head_is_the_final_linear(arch, head):
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None, num_classes=7)
    name, layer = M.find_head(model)
    assert name == head
    assert layer.out_features == 7


def test_backbone_output_is_the_head_input():
    model = make_model("mobilenet_v3_small", num_classes=5)
    backbone, heads, dim = M.split_backbone(model)
    head_name = heads.head
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        assert feats.shape == (2, dim)
        torch.testing.assert_close(model.get_submodule(head_name)(feats), model(x))
    # the original keeps its head
    assert isinstance(model.get_submodule(head_name), torch.nn.Linear)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "resnet34"])
def test_infer_arch_from_state_dict(arch):
    with torch.device("meta"):
        sd = torchvision.models.get_model(arch, weights=None, num_classes=10).state_dict()
    assert M.infer_arch(sd) == arch


def test_infer_arch_gives_up_clearly():
    with pytest.raises(ArchitectureError, match="pass --arch"):
        M.infer_arch({"foo.weight": torch.zeros(3, 3)})


def test_custom_factory_and_bad_names():
    model = M.build_model("tests.factories:tiny_net", 4)
    assert M.find_head(model)[1].out_features == 4
    with pytest.raises(ArchitectureError, match="unknown architecture 'resnet5000'"):
        M.build_model("resnet5000", 3)
    with pytest.raises(ArchitectureError, match="cannot import"):
        M.build_model("no_such_pkg.mod:fn", 3)


def test_weights_that_do_not_fit_name_the_keys():
    model = M.build_model("resnet18", 3)
    sd = make_model("resnet34").state_dict()
    with pytest.raises(ArchitectureError, match="do not fit resnet18.*unexpected"):
        M.load_weights(model, sd, "resnet18")


def test_default_preprocess_sources():
    pre, src = M.default_preprocess("resnet50")
    assert (pre.resize, pre.crop) == (256, 224) and "IMAGENET1K_V1" in src
    pre, _ = M.default_preprocess("inception_v3")
    assert (pre.resize, pre.crop) == (342, 299)
    pre, src = M.default_preprocess("resnet50", {"val_resize_size": 232, "val_crop_size": 224})
    assert (pre.resize, pre.crop) == (232, 224) and "training args" in src
    pre, _ = M.default_preprocess("tests.factories:tiny_net")
    assert (pre.resize, pre.crop) == (256, 224)


def test_layers_as_wide_as_the_head_are_auxiliary_only_if_unused_at_eval():
    """Swin V2's cpb_mlp has one output per attention head (3 in its first stage): with 3
    classes it looks like a head, but the model uses it, so its rows must not be re-ordered.
    GoogLeNet's aux1.fc2/aux2.fc2 run in training only: those are auxiliary heads."""
    torch.manual_seed(0)
    swin = torchvision.models.swin_v2_t(num_classes=3)
    candidates = M.find_heads(swin)
    assert "features.1.0.attn.cpb_mlp.2" in candidates.auxiliary
    before = {k: v.clone() for k, v in swin.state_dict().items()}
    settled, used = M.settle_auxiliary(swin, candidates, 64)
    assert settled.auxiliary == () and set(used) == set(candidates.auxiliary)
    assert all(torch.equal(before[k], v) for k, v in swin.state_dict().items())  # restored
    googlenet = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=False)
    settled, used = M.settle_auxiliary(googlenet, M.find_heads(googlenet), 64)
    assert settled.auxiliary == ("aux1.fc2", "aux2.fc2") and used == []
