"""The path rule: no output equals, contains or lies inside an input; checked on real files and links."""

import os

import pytest

from lnfm.errors import LnfmError
from lnfm.safety import PathClash, check_apart


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "data" / "dicom").mkdir(parents=True)
    (tmp_path / "data" / "scan.nii.gz").write_bytes(b"ct")
    (tmp_path / "model").mkdir()
    return tmp_path


@pytest.mark.parametrize("output,relation", [
    ("data/scan.nii.gz", "is"),  # the input itself
    ("data/./dicom/../scan.nii.gz", "is"),  # the same file spelled differently
    ("data/dicom/mask.nii.gz", "lies inside"),  # inside an input folder
    ("data", "contains"),  # a folder holding the input
    (".", "contains"),
])
def test_outputs_touching_an_input_are_refused_naming_both(tree, output, relation):
    inputs = {"--input": [str(tree / "data" / "scan.nii.gz"), str(tree / "data" / "dicom")]}
    out = str(tree / output)
    with pytest.raises(PathClash) as e:
        check_apart({"--output": out}, inputs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(out) and f"--output {relation} --input" in msg
    assert isinstance(e.value, LnfmError)


def test_links_count_as_the_same_path(tree):
    os.symlink(tree / "data", tree / "alias")
    with pytest.raises(PathClash, match="is --input"):
        check_apart({"--output": tree / "alias" / "scan.nii.gz"}, {"--input": tree / "data" / "scan.nii.gz"})
    os.link(tree / "data" / "scan.nii.gz", tree / "hard.nii.gz")  # another name for the same bytes
    with pytest.raises(PathClash, match="is --input"):
        check_apart({"--output": tree / "hard.nii.gz"}, {"--input": tree / "data" / "scan.nii.gz"})


def test_separate_paths_pass_and_outputs_must_differ(tree):
    check_apart({"--output": tree / "out" / "mask.nii.gz", "--report": tree / "out" / "nodes.csv"},
                {"--input": tree / "data" / "scan.nii.gz", "--model": tree / "model", "--none": None})
    check_apart({"--output": tree / "datasets"}, {"--input": tree / "data"})  # a shared prefix is not nesting
    check_apart({"--output": "gs://bucket/store"}, {"--input": tree / "data"})  # URLs are not local paths
    with pytest.raises(PathClash, match="--output and --probabilities name the same path"):
        check_apart({"--output": tree / "a.nii.gz", "--probabilities": tree / "a.nii.gz"}, {})
    check_apart({"--output": tree / "a", "--report": tree / "a"}, {}, distinct=False)
    with pytest.raises(PathClash, match="--out lies inside --model"):
        check_apart({"--out": tree / "model" / "export"}, {"--model": tree / "model"})


def test_an_output_through_a_link_to_nothing_is_refused_naming_the_link(tree):
    """mkdir and rename meet such a link (FileExistsError, NotADirectoryError) after the job's work; once its
    target exists, the link is an ordinary way to a folder."""
    os.symlink(tree / "gone", tree / "results")
    for output, where in ((tree / "results", "is"), (tree / "results" / "a" / "mask.nii.gz", "lies under")):
        with pytest.raises(PathClash) as e:
            check_apart({"--output": output}, {})
        msg = str(e.value)
        assert msg == (f"{output}: --output {where} {tree / 'results'}, a link to {tree / 'gone'}, which does not "
                       f"exist; create its target or choose another path")
    (tree / "gone").mkdir()
    check_apart({"--output": tree / "results" / "mask.nii.gz"}, {})
