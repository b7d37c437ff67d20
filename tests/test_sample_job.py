"""`--mode sample` writes the grid and the images, and agrees with the notebook API."""

import jax
import numpy as np
import pytest
from PIL import Image
from runs import small_config

import uvit_jax
from uvit_jax import checkpoints, images, jobs
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.train.optimizer import make_optimizer
from uvit_jax.train.state import create_train_state

pytestmark = pytest.mark.integration  # the sample job end to end on 8 devices (~7 s)


def test_sample_mode_writes_grid_and_images(tmp_path):
    config = small_config()
    config.model.update(embed_dim=32)
    config.sample.update(num_samples=20, batch_size=8, steps=4)
    mesh = make_mesh(config.mesh)  # 8 devices
    state = create_train_state(config.model, make_optimizer(config.optim, 10), mesh, 0)
    manager = checkpoints.open_manager(tmp_path)
    item, ema = state.checkpoint_items()
    checkpoints.save(manager, 7, ema=ema, config=config, state=item)
    manager.wait_until_finished()

    jobs.run("sample", config, str(tmp_path))
    (npz,) = (tmp_path / "samples").glob("sample_step7_seed0_*.npz")  # _<settings digest>
    path = npz.with_suffix("")
    saved = np.load(f"{path}.npz")
    assert saved["arr_0"].shape == (20, 28, 28, 1) and saved["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(saved["labels"], np.arange(20) % 10)
    grid = np.asarray(Image.open(f"{path}.png"))
    assert grid.shape == (2 * 30 + 2, 10 * 30 + 2)  # 20 images: two rows of the 10 classes

    # Batch 0 is what a notebook draws with the same seed and labels.
    m = uvit_jax.load(tmp_path, mesh=mesh)
    x = uvit_jax.sample(m, labels=np.arange(8), seed=0, steps=4)
    np.testing.assert_array_equal(images.to_uint8(jax.device_get(x)), saved["arr_0"][:8])
