"""The command-line tools: package entry points without sys.path edits, whose --help imports nothing heavy."""
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p for p in glob.glob(str(REPO / 'tools' / '*.py')) if not p.endswith('__init__.py'))
HEAVY = ('torch', 'mmengine', 'mmseg', 'mmcv', 'transformers', 'backbones', 'chat', 'segmentation',
         'classification', 'mm_adapter')

HELP = """
    import json, runpy, sys, time
    sys.argv = [{tool!r}, '--help']
    start = time.perf_counter()
    try:
        runpy.run_path({tool!r}, run_name='__main__')
    except SystemExit as err:
        code = err.code
    else:
        code = 0
    print(json.dumps(dict(code=code, seconds=time.perf_counter() - start,
                          heavy=sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))))
"""


def test_every_tool_is_part_of_the_installed_package_and_edits_no_sys_path():
    assert 'package-dir = {"internvit_tools" = "tools"}' in (REPO / 'pyproject.toml').read_text()
    assert (REPO / 'tools' / '__init__.py').is_file()
    for tool in TOOLS:
        assert 'sys.path' not in Path(tool).read_text(), tool


@pytest.mark.parametrize('tool', TOOLS, ids=[Path(t).stem for t in TOOLS])
def test_help_answers_without_importing_heavy_modules(tool):
    code = textwrap.dedent(HELP.format(tool=tool, heavy=HEAVY))
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['code'] in (0, None) and result['heavy'] == [], (tool, result)
    assert 'usage' in proc.stdout.lower() or 'Arguments' in proc.stdout
