"""Tests for the OpenMMLab adapter (mm_adapter): the mmcv.ops stand-in, the checkpoint trust boundary, registration,
atomic checkpoint writes, and that the torch-only packages import no OpenMMLab module."""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mm_adapter import compat

from helpers import toy_regression_model

REPO = Path(__file__).resolve().parents[1]


def _start_python(code: str) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter at the repo root; it must print one JSON line last."""
    return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONPATH': str(REPO)})


def _result(proc: subprocess.Popen, timeout: float = 180) -> dict:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# ensure_mmcv_ops
# ---------------------------------------------------------------------------------------------------------------

# Both branches run in fresh interpreters (several seconds of imports each); they start when this module's first
# test starts and run beside the in-process tests. Their assertions are the last two tests of the file.

# sys.modules['mmcv._ext'] = None makes the extension unimportable even where a compiled mmcv is installed.
SHIM_BRANCH = """
    import json, sys
    sys.modules['mmcv._ext'] = None
    import mm_adapter                     # calls ensure_mmcv_ops() before anything imports mmseg
    from mm_adapter.compat import ensure_mmcv_ops, MissingCompiledOpError
    import mmcv.ops
    import mmseg.models
    from mmseg.models.decode_heads import FCNHead, UPerHead, SegformerHead, CCHead
    from mmseg.utils import mask_classification
    from mmcv.cnn import ConvModule
    import torch
    conv = ConvModule(3, 4, 3, padding=1, norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'))
    y = conv(torch.randn(2, 3, 8, 8))
    head = UPerHead(in_channels=[8, 8, 8, 8], in_index=[0, 1, 2, 3], channels=8, num_classes=3,
                    norm_cfg=dict(type='BN')).eval()
    seg = head([torch.randn(1, 8, s, s) for s in (16, 8, 4, 2)])
    fcn = FCNHead(in_channels=8, channels=8, num_convs=0, concat_input=False, num_classes=3)
    try:
        CCHead(in_channels=8, channels=8, num_classes=3)
        cc_error = None
    except MissingCompiledOpError as err:
        cc_error = str(err)
    try:
        from mmcv.ops import nms
        other_error = None
    except ModuleNotFoundError as err:
        other_error = str(err)
    print(json.dumps(dict(
        shim=bool(getattr(mmcv.ops, '__mmcv_ops_shim__', False)),
        again=ensure_mmcv_ops(), same=sys.modules['mmcv.ops'] is mmcv.ops,
        mmseg_uses_shim=mask_classification.point_sample is mmcv.ops.point_sample,
        conv=list(y.shape), seg=list(seg.shape), fcn=list(fcn([torch.randn(1, 8, 4, 4)]).shape),
        cc_error=cc_error, other_error=other_error)))
"""

# A (fake) importable mmcv._ext means a compiled mmcv: mmcv.ops must be left alone. compat.py is loaded by path so
# that nothing else in the package can import mmcv.ops first.
COMPILED_BRANCH = f"""
    import importlib.util, json, sys, types
    sys.modules['mmcv._ext'] = types.ModuleType('mmcv._ext')
    spec = importlib.util.spec_from_file_location('compat_under_test', {str(REPO / 'mm_adapter' / 'compat.py')!r})
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    import mmcv
    first, second = compat.ensure_mmcv_ops(), compat.ensure_mmcv_ops()
    print(json.dumps(dict(first=first, second=second, ops_loaded='mmcv.ops' in sys.modules,
                          attr=hasattr(mmcv, 'ops'))))
"""

# The torch-only packages: importing them (and using the model and its weight code) loads no OpenMMLab module, and
# classification does not pull in segmentation (whose import registers its modules everywhere).
TORCH_ONLY = """
    import json, sys
    import backbones, backbones.writing, chat.model, chat.checkpoint, chat.sft
    import torch
    model = backbones.InternViT('internvit_tiny')
    model.forward_features(torch.zeros(1, 3, 28, 28))
    torch_only = sorted(m for m in sys.modules if m.split('.')[0] in ('mmengine', 'mmseg', 'mmcv'))
    import classification
    print(json.dumps(dict(torch_only=torch_only, segmentation='segmentation' in sys.modules)))
"""


@pytest.fixture(scope='module', autouse=True)
def fresh_interpreters():
    procs = dict(shim=_start_python(SHIM_BRANCH), compiled=_start_python(COMPILED_BRANCH),
                 torch_only=_start_python(TORCH_ONLY))
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_point_sample_matches_hand_computation():
    # 1x1x2x3 map; points in [0, 1]^2. With align_corners=False, pixel j covers [j/W, (j+1)/W]; its centre is
    # at (j + 0.5)/W. Bilinear interpolation between centres, zeros outside the map.
    feat = torch.tensor([[[[1., 2., 3.],
                           [4., 5., 6.]]]])
    points = torch.tensor([[[0.5, 0.5],           # x=1.5 px, y=1.0 px -> centre column 1, halfway rows: (2+5)/2
                            [1 / 6, 0.25],        # exactly the centre of pixel (row 0, col 0) -> 1
                            [0.5 / 3 + 1 / 6, 0.25],  # x halfway between col 0 and col 1 centres, row 0 -> 1.5
                            [0.0, 0.25]]])        # x=0 px: half a pixel left of col 0's centre -> 0.5*1 + 0.5*0
    out = compat.point_sample(feat, points)
    assert out.shape == (1, 1, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([3.5, 1.0, 1.5, 0.5]))
    # align_corners=True: 0 and 1 are the corner pixels' centres.
    out = compat.point_sample(feat, torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.25, 0.5]]]), align_corners=True)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 6.0, 0.5 * (1.5 + 4.5)]))
    # 4-D points give (N, C, Hg, Wg)
    assert compat.point_sample(feat, torch.rand(1, 2, 5, 2)).shape == (1, 1, 2, 5)


def test_placeholders_raise_when_used_not_when_imported():
    shim = compat._build_shim()
    cls = shim.PSAMask                       # importing / referencing is fine
    assert isinstance(cls, type) and not isinstance(object(), cls)
    with pytest.raises(compat.MissingCompiledOpError, match=r'mmcv\.ops\.PSAMask needs a compiled mmcv'):
        cls('collect', (3, 3))
    with pytest.raises(compat.MissingCompiledOpError, match=r'sigmoid_focal_loss needs a compiled mmcv'):
        shim.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ModuleNotFoundError, match=r'mmcv\.ops\.roi_align needs a compiled mmcv'):
        shim.roi_align
    assert not hasattr(shim, '__wrapped__')  # private names stay ordinary AttributeErrors


# ---------------------------------------------------------------------------------------------------------------
# trust_checkpoints_in
# ---------------------------------------------------------------------------------------------------------------


def _toy_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = [dict(inputs=x[i], targets=x[i, :1] * 2) for i in range(32)]
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def _runner(work_dir, max_iters, name, resume=False, hooks=()):
    from mmengine.runner import Runner
    return Runner(
        model=toy_regression_model(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=_toy_loader(), train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(hooks), resume=resume, default_scope='mmengine',
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo')))


def test_real_resume_needs_and_gets_the_trust_boundary(tmp_path, restore_loaders, monkeypatch):
    import mmengine.runner.runner
    from mmengine.hooks import Hook
    from mmengine.runner.checkpoint import _load_checkpoint
    from mmengine.runner.checkpoint import load_from_local as mmengine_load_from_local

    monkeypatch.setattr(mmengine.runner.runner, 'collect_env', dict)  # environment report: 1 s a Runner, unused
    work_dir = tmp_path / 'work_dir'
    runner = _runner(work_dir, max_iters=4, name='first')
    runner.train()
    assert (work_dir / 'iter_4.pth').is_file()
    trained = {k: v.clone() for k, v in runner.model.state_dict().items()}

    # The problem: MMEngine's own loader (torch.load, weights_only=True by default), which Runner.resume calls
    # through _load_checkpoint, cannot read the checkpoint MMEngine just wrote.
    restore_loaders.register_scheme('', mmengine_load_from_local, force=True)
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        _load_checkpoint(str(work_dir / 'iter_4.pth'), map_location='cpu')

    class RecordIters(Hook):
        def __init__(self):
            self.iters = []

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.iters.append(runner.iter)

    record = RecordIters()
    assert compat.trust_checkpoints_in(work_dir) == os.path.realpath(work_dir)
    resumed = _runner(work_dir, max_iters=6, name='resumed', resume=True, hooks=[record])
    resumed.load_or_resume()
    for key, value in trained.items():   # model weights restored before training continues
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    resumed.train()
    assert record.iters == [4, 5]        # continues at iteration 4, not from 0
    assert resumed.iter == 6
    assert (work_dir / 'iter_6.pth').is_file()

    # Another run's checkpoint (load_from, tools/test.py): outside the trusted dir its tensors and plain metadata
    # still load, the message hub becomes an inert stand-in.
    elsewhere = tmp_path / 'other_run' / 'iter_4.pth'
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((work_dir / 'iter_4.pth').read_bytes())
    checkpoint = _load_checkpoint(str(elsewhere), map_location='cpu')
    for key, value in trained.items():
        torch.testing.assert_close(checkpoint['state_dict'][key], value)
    assert checkpoint['meta']['iter'] == 4
    buffers = checkpoint['message_hub']['log_scalars'].values()
    assert buffers and all(type(b).__module__ == 'backbones.reading' for b in buffers)  # never a HistoryBuffer


class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_outside_work_dir_is_refused(tmp_path, restore_loaders):
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    work_dir = tmp_path / 'work_dir'
    work_dir.mkdir()
    marker = tmp_path / 'PAYLOAD_RAN'
    evil = tmp_path / 'downloads' / 'pretrained.pth'
    evil.parent.mkdir()
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': _Payload(marker)}, evil)
    plain = tmp_path / 'downloads' / 'plain.pth'
    torch.save({'w': torch.ones(2)}, plain)
    link = work_dir / 'looks_like_mine.pth'   # a symlink inside the work dir does not make the file trusted
    link.symlink_to(evil)

    compat.trust_checkpoints_in(work_dir)
    for path in (evil, link):
        with pytest.raises(compat.UntrustedCheckpointError) as info:
            _load_checkpoint(str(path), map_location='cpu')
        message = str(info.value)
        assert str(path) in message
        assert 'not a checkpoint this run wrote' in message
        assert 'safetensors or a plain state dict' in message
        assert isinstance(info.value, pickle.UnpicklingError)
        assert not marker.exists()
    assert CheckpointLoader._get_checkpoint_loader(str(evil)).__name__ == 'load_from_local'

    # Downloads go through the same boundary (file:// stands in for https:// here; no network needed).
    download = CheckpointLoader._get_checkpoint_loader('https://example.org/pretrained.pth')
    with pytest.raises(compat.UntrustedCheckpointError, match='not a checkpoint this run wrote'):
        download(evil.as_uri(), 'cpu', model_dir=str(tmp_path / 'hub'))
    assert not marker.exists()

    # Plain tensors from anywhere still load (weights_only=True succeeds).
    torch.testing.assert_close(_load_checkpoint(str(plain), map_location='cpu')['w'], torch.ones(2))

    # The boundary is the location: the same bytes, written inside the work dir, are unpickled in full. This also
    # shows the payload above is live, so the refusal is what kept the marker from being created.
    inside = work_dir / 'iter_1.pth'
    inside.write_bytes(evil.read_bytes())
    _load_checkpoint(str(inside), map_location='cpu')
    assert marker.is_dir()

    # trust_checkpoints_in(None) trusts no directory at all.
    os.rmdir(marker)
    compat.trust_checkpoints_in(None)
    with pytest.raises(compat.UntrustedCheckpointError, match='no work dir is trusted'):
        _load_checkpoint(str(inside), map_location='cpu')
    assert not marker.exists()


def test_shim_branch_makes_mmseg_importable(fresh_interpreters):
    out = _result(fresh_interpreters['shim'])
    assert out['shim'] and out['again'] and out['same'] and out['mmseg_uses_shim']
    assert out['conv'] == [2, 4, 8, 8]
    assert out['seg'] == [1, 3, 16, 16]
    assert out['fcn'] == [1, 3, 4, 4]
    assert 'mmcv.ops.CrissCrossAttention needs a compiled mmcv' in out['cc_error']
    assert 'mmcv.ops.nms needs a compiled mmcv' in out['other_error']


def test_compiled_branch_changes_nothing(fresh_interpreters):
    assert _result(fresh_interpreters['compiled']) == dict(first=False, second=False, ops_loaded=False, attr=False)


def test_backbones_and_chat_import_no_openmmlab_module(fresh_interpreters):
    out = _result(fresh_interpreters['torch_only'])
    assert out == dict(torch_only=[], segmentation=False)


def test_registered_in_root_and_mmseg_registries():
    from mmengine.registry import MODELS as ROOT
    from mmseg.registry import MODELS as MMSEG

    import mm_adapter  # noqa: F401
    from backbones import InternViT
    for registry in (ROOT, MMSEG):
        model = registry.build(dict(type='InternViT', preset='internvit_tiny', out_indices=[1], frozen=True))
        assert isinstance(model, InternViT) and model.frozen and model.out_indices == [1]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from mmengine.fileio import get_file_backend

    from mm_adapter.atomic_io import AtomicLocalBackend, install_atomic_local_backend
    install_atomic_local_backend()  # what mm_adapter.runtime.build_runner does for every run
    target = tmp_path / 'iter_2.pth'
    backend = get_file_backend(str(target))
    assert isinstance(backend, AtomicLocalBackend)  # MMEngine's backend for local paths
    backend.put(b'old checkpoint', str(target))

    def crash(*args):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match='disk full'):
        backend.put(b'new checkpoint, cut short', str(target))
    assert target.read_bytes() == b'old checkpoint'  # the previous file is intact
    assert os.listdir(tmp_path) == ['iter_2.pth']  # and no partial file is left
