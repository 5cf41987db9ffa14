"""A resumed run follows the config's parameter schedules (``mm_adapter.schedule_resume``): resumed to train longer,
it continues the curve an uninterrupted run of the longer config follows, for MMEngine's chained schedulers and the
project's closed-form ones alike. A toy model on a plain MMEngine Runner, a few iterations."""
import pytest
import torch

import segmentation  # noqa: F401  (registers PolyLRWithLinearWarmup)
from mm_adapter import compat
from mm_adapter.schedule_resume import install_config_shaped_resume

from helpers import toy_regression_model


def toy_loader():
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader([dict(inputs=x[i], targets=x[i, :1]) for i in range(32)], batch_size=4)


SCHEDULES = {  # each ends with the run (as runtime.tie_schedule_to_max_iters makes the configs' schedulers do)
    'LinearLR+PolyLR': lambda n: [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
                                  dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=2, end=n)],
    'PolyLRWithLinearWarmup': lambda n: [dict(type='PolyLRWithLinearWarmup', warmup_iters=2, warmup_ratio=0.1,
                                              end=n)],
    'CosineAnnealingLR': lambda n: [dict(type='CosineAnnealingLR', eta_min=1e-3, by_epoch=False, begin=0, end=n)],
}


def run(work_dir, schedule, iters, resume=False):
    """Train ``iters`` iterations (a checkpoint at the end); returns the lr each iteration ran at, by iteration."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class RecordLr(Hook):
        def __init__(self):
            self.lrs = {}

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.lrs[runner.iter] = runner.optim_wrapper.get_lr()['lr'][0]

    record = RecordLr()
    runner = Runner(model=toy_regression_model(), work_dir=str(work_dir), train_dataloader=toy_loader(),
                    train_cfg=dict(by_epoch=False, max_iters=iters),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)), param_scheduler=schedule(iters),
                    default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=iters, by_epoch=False)),
                    custom_hooks=[record], resume=resume, default_scope='mmengine',
                    env_cfg=dict(cudnn_benchmark=False))
    install_config_shaped_resume(runner)
    runner.train()
    return record.lrs


@pytest.mark.parametrize('name', list(SCHEDULES))
def test_resumed_to_train_longer_continues_the_uninterrupted_curve(name, tmp_path, restore_loaders, monkeypatch):
    # restore_loaders: tests/conftest.py
    import mmengine.runner.runner
    monkeypatch.setattr(mmengine.runner.runner, 'collect_env', dict)  # environment report: 1 s a Runner, unused
    schedule = SCHEDULES[name]
    straight = run(tmp_path / 'straight', schedule, 8)
    first = run(tmp_path / 'resumed', schedule, 4)  # ends at its own end, 4
    compat.trust_checkpoints_in(tmp_path / 'resumed')
    resumed = run(tmp_path / 'resumed', schedule, 8, resume=True)  # the same run, resumed with 8 iterations
    assert sorted(resumed) == [4, 5, 6, 7]
    # MMEngine alone would restore end=4 (PolyLR and cosine then stay at their last value, 0 or eta_min)
    assert [resumed[i] for i in range(4, 8)] == pytest.approx([straight[i] for i in range(4, 8)], rel=1e-12)
    assert resumed[4] > resumed[5] > resumed[6] > resumed[7]  # still decreasing
    assert first[0] == straight[0]
