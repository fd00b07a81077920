"""The transfer configs (CIFAR-10/100, Flowers-102, Pets) on TFDS mock data, one of them fine-tuning from a
CRATE-MAE bundle; the bundled MNIST source."""

import importlib

import jax
import numpy as np
import pytest

from crate_jax.configs import transfer
from crate_jax.data.images import loader
from crate_jax.data.images.classification import MnistSource
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.setup import make_task
from train_helpers import losses

CLASSES = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "pets": 37}


def shrink(c):
    c.model.update(width=16, depth=1, num_heads=2, patch_size=8)
    c.res = 16
    c.data.update(tfds_decoder="tfds", resize_small=16, num_threads=2)
    c.mesh.update(num_devices=1)
    c.update(batch_size=4, eval_batch_size=4, total_steps=1, log_every=1, async_checkpoints=False)
    return c


@pytest.mark.parametrize("dataset", sorted(CLASSES))
def test_transfer_config_reads_mock_tfds(dataset):
    import tensorflow_datasets as tfds
    c = shrink(transfer.get_config(f"dataset={dataset},variant=T/8"))
    with tfds.testing.mock_data(num_examples=8):
        task = make_task(c)
        assert task.num_classes == CLASSES[dataset]
        it = task.train_iterator(batch_size=4, process_index=0, process_count=1)
        batch = next(it)
        it.close()
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert ((0 <= batch["label"]) & (batch["label"] < CLASSES[dataset])).all()
    assert c.data.name == transfer.DATASETS[dataset][0] and c.optim.wd == 0.01


def test_transfer_fine_tunes_from_a_crate_mae_bundle_on_mock_cifar10(tmp_path):
    import tensorflow_datasets as tfds
    from crate_jax.checkpoint.bundle import params_dict, save_bundle
    from crate_jax.models.mae import build_mae, mae_config
    cfg = mae_config("T/8", image_size=16, width=16, depth=1, num_heads=2)
    save_bundle(tmp_path / "mae", cfg, jax.tree.map(np.asarray, jax.jit(lambda: params_dict(build_mae(cfg, 0)))()))
    c = transfer.get_config(f"dataset=cifar10,init={tmp_path / 'mae'}")
    # the classifier's structure is read from the bundle: CRATE, λ = 0.5, final eps 1e-6 (docs/math.md §CRATE-MAE)
    assert (c.model.name, c.model.lmbda, c.model.final_ln_eps, c.model.width) == ("crate", 0.5, 1e-6, 16)
    c = shrink(c)
    c.evals = {}
    with tfds.testing.mock_data(num_examples=8):
        train_and_evaluate(c, tmp_path / "wd")
    assert list(losses(tmp_path / "wd")) == [1]


def test_mnist_source_is_the_bundled_5k_subset_with_a_fixed_split():
    train, test = MnistSource("train"), MnistSource("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test._labels).tolist() == [100] * 10  # stratified: 500 per class in all
    assert train[0]["image"].shape == (28, 28, 3) and train[0]["image"].dtype == np.uint8
    assert set(train.indices).isdisjoint(test.indices)
    np.testing.assert_array_equal(MnistSource("test").indices, test.indices)  # fixed by split_seed
    assert not np.array_equal(MnistSource("test", split_seed=1).indices, test.indices)
    from ml_collections import ConfigDict
    cfg = ConfigDict(dict(source="mnist", train_split="train", eval_split="test", augment="none"))
    assert loader.num_classes(cfg) == 10 and loader.num_examples(cfg, "test") == 1000
    batch = next(iter(loader.make_eval_iterator(cfg, batch_size=8, image_size=32)))
    assert batch["image"].shape == (8, 32, 32, 3)
