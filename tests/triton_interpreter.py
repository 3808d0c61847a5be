"""Running a script under Triton's CPU interpreter for the kernels' CPU tests. TRITON_INTERPRET=1 has to be set
before triton is first imported, hence a subprocess; the script prints "WORST <number>" last."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# numpy >= 2.4 refuses int() of a 1-element array, which the interpreter does for loop bounds
PATCH = textwrap.dedent('''
    import triton.runtime.interpreter as interp

    _patch = interp._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interp._patch_lang_tensor = _patched
''')


def run_interpreted(script: str, timeout: int = 600) -> str:
    """Run `script` with the kernels interpreted on the CPU; returns what it printed after its last "WORST" (the
    largest errors it saw)."""
    pytest.importorskip("triton")
    paths = [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]  # the script may import test modules
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, "-c", PATCH + textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("WORST")[-1]
