"""tools/gpu_benchmarks.py: skips cleanly without CUDA; --cpu-smoke runs one case of each kind on the CPU."""
import json
import os.path as osp
import runpy

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool():
    return runpy.run_path(osp.join(ROOT, 'tools', 'gpu_benchmarks.py'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='tests the behaviour without CUDA')
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path, capsys):
    assert load_tool()['main'](['--out', str(tmp_path / 'out')]) == 0
    assert 'no CUDA device; nothing run, nothing written' in capsys.readouterr().out
    assert not (tmp_path / 'out').exists()


def test_cpu_smoke_runs_each_kind_of_case_and_writes_json_and_table(tmp_path):
    tool = load_tool()
    only = ['224px b64 sdpa', 'fwd+bwd 504px b8 sdpa', 'UperNet', 'feature extraction']
    assert tool['main'](['--cpu-smoke', '--out', str(tmp_path), '--only', *only]) == 0
    [json_file] = tmp_path.glob('gpu_benchmarks_*.json')
    report = json.loads(json_file.read_text())
    rows = {row['name']: row for row in report['cases']}
    assert len(rows) == 5  # the 224px sdpa case twice: plain, and compiled (skipped in the smoke test)
    measured = [row for row in rows.values() if 'skipped' not in row]
    assert {row['kind'] for row in measured} == {'backbone', 'segmentation', 'probe'}
    for row in measured:
        assert 'error' not in row, row
        assert row['images_per_s'] > 0 and row['tflops'] > 0 and row['peak_memory_gib'] > 0, row
    compiled = [row for row in rows.values() if row.get('compile')]
    assert [row['skipped'] for row in compiled] == ['compile not run in the CPU smoke test (tests/test_compile.py '
                                                    'covers it)']
    table = json_file.with_suffix('.md').read_text()
    assert table.startswith('# Benchmarks on cpu (smoke)')
    for name in rows:
        assert f'| {name} |' in table
