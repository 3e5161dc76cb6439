"""`python train.py --help` prints the project's help: the groups, the keys that matter, the example commands."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, TRAIN_PY


@pytest.mark.timeout(120)
def test_help_names_groups_keys_and_examples(tmp_path):
    result = subprocess.run([sys.executable, str(TRAIN_PY), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("moco-train (python train.py)")
    assert "data: cifar10, cifar100, digits, fashion_mnist, imagefolder" in text
    assert "experiment:" in text and "my_images" in text
    keys = text.split("== The keys that matter most ==")[1].split("== Examples ==")[0].strip().splitlines()
    assert len(keys) == 10 and keys[0].startswith("data.data_dir=")
    assert "python train.py experiment=my_images data.data_dir=" in text
    assert len(text.splitlines()) < 60  # not the 200 lines of the composed config
    assert not (tmp_path / "outputs").exists()


def test_the_stem_rule_of_the_help_is_what_the_configs_compose(compose_train):
    """--help's line on data.image_size names the datasets whose recipe takes the ImageNet stem below 64 px."""
    template = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["hydra"]["help"]["template"]
    [line] = [line for line in template.splitlines() if line.strip().startswith("data.image_size=")]
    rule = re.search(r"CIFAR stem at <= (\d+) px; ([\w, ]+): ImageNet stem", line)
    assert rule, line
    limit, exceptions = int(rule[1]), [name.strip() for name in rule[2].split(",")]
    assert "digits" in exceptions  # the default run
    for data in exceptions:
        cfg = compose_train([f"data={data}"])
        assert cfg.data.image_size <= limit and cfg.model.cifar_stem is False, data
    cifar = compose_train(["data=cifar10"])
    assert cifar.data.image_size <= limit and cifar.model.cifar_stem is True
    assert compose_train(["data=stl10"]).model.cifar_stem is (96 <= limit)
