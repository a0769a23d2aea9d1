import json

import pytest

from pipeline import data as D
from pipeline.errors import DataError

from .conftest import BAD_KINDS, write_bad


def test_class_order_plain_text(tmp_path):
    p = tmp_path / "order.txt"
    p.write_text("# correct order\nn03\n\nn01\nn02\n")
    assert D.read_class_order(p) == ["n03", "n01", "n02"]


def test_class_order_imagenet_json(tmp_path):
    p = tmp_path / "imagenet_class_index.json"
    p.write_text(json.dumps({"1": ["n01", "goldfish"], "0": ["n03", "tench"], "2": ["n02", "x"]}))
    assert D.read_class_order(p) == ["n03", "n01", "n02"]


@pytest.mark.parametrize(("text", "match"), [
    ('{"0": ["a", "x"], "2": ["b", "y"]}', "without gaps"),
    ('{"zero": ["a", "x"]}', "must be indices"),
    ("{not json", "not valid JSON"),
    ("a\nb\na\n", "more than once"),
    ("\n# nothing\n", "lists no classes"),
])
def test_bad_class_order_files(tmp_path, text, match):
    p = tmp_path / "order.txt"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        D.read_class_order(p)


def test_audit_reports_each_disagreement(tmp_path):
    p = tmp_path / "order.txt"
    p.write_text("n03\nn01\nn02\n")
    order = D.resolve_class_order(["n01", "n02", "n03"], p, ["n01", "n02", "n03"])
    assert order.classes == ["n03", "n01", "n02"]
    text = " | ".join(order.warnings)
    assert "class-order file and sorted folder names disagree at 3 of 3" in text
    assert "checkpoint's own class mapping and the class-order file" in text


def test_audit_flags_natural_sort_and_unknown_folders(tmp_path):
    order = D.resolve_class_order(["1", "10", "2"], None, None)
    assert any("natural sort" in w for w in order.warnings)
    p = tmp_path / "order.txt"
    p.write_text("a\nb\n")
    with pytest.raises(DataError, match="class folder.*c.*are not in"):
        D.resolve_class_order(["a", "b", "c"], p, None)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_sniff_each_kind(tmp_path, photos, kind):
    path = tmp_path / "x.jpg"
    write_bad(path, kind, photos)
    fmt, problem = D.sniff(path.read_bytes())
    expected = {
        "zero_bytes": (None, "empty file"),
        "html": (None, "HTML"),
        "truncated": ("jpeg", "truncated JPEG"),
        "corrupt_png": ("png", None),  # only a decoder can tell
        "cmyk": ("jpeg", None), "grayscale": ("jpeg", None),
        "png": ("png", None), "webp": ("webp", None), "gif": ("gif", None),
    }[kind]
    assert fmt == expected[0]
    if expected[1] is None:
        assert problem is None
    else:
        assert expected[1] in problem


def test_splits_found_and_missing(tmp_path, tree):
    assert D.find_splits(tree, None) == ["train", "val"]
    with pytest.raises(DataError, match="test.*not found"):
        D.find_splits(tree, ["test"])
    with pytest.raises(DataError, match="no split folders"):
        D.find_splits(tree / "train", None)
