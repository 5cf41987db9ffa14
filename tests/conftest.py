"""Fixtures shared by several test modules. None is autouse: a module names the ones it wants, e.g.
``pytestmark = pytest.mark.usefixtures('one_thread')``."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for the module, restored after: tiny models on a small shared CPU are fastest with one
    thread per process (two threads that get descheduled make each step many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def private_hash_cache(tmp_path, monkeypatch):
    """Backbone weight hashes (classification's backbone identity) cached under the test's tmp_path, never in
    ~/.cache."""
    monkeypatch.setenv('INTERNVIT_CACHE_DIR', str(tmp_path / 'hash_cache'))
    return tmp_path / 'hash_cache'


@pytest.fixture(scope='module')
def data_root(request, tmp_path_factory):
    """A tiny synthetic ADE20K (``segmentation.testing.make_tiny_dataset``) for the module: 8 training and 2
    validation images of 112 px, or what the module's ``TINY_DATASET`` dict says."""
    from segmentation.testing import make_tiny_dataset
    shape = {'num_train': 8, 'num_val': 2, 'size': 112, **getattr(request.module, 'TINY_DATASET', {})}
    return make_tiny_dataset(str(tmp_path_factory.mktemp(request.module.__name__.rpartition('.')[2]) / 'synth'),
                             **shape)


@pytest.fixture
def restore_loaders():
    """MMEngine's checkpoint loader schemes put back after the test (``mm_adapter.compat.trust_checkpoints_in``
    replaces them); yields ``CheckpointLoader``."""
    from mmengine.runner.checkpoint import CheckpointLoader
    saved = CheckpointLoader._schemes.copy()
    yield CheckpointLoader
    CheckpointLoader._schemes = saved
