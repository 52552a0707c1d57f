"""The CUDA backend in CI, without a GPU: test_cuda_kernels.py, test_cuda_attention.py, test_cuda_model.py and
test_cuda_gpu_check.py in one subprocess under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM must be set before
numba.cuda is imported, so not in this process), and the one-line error when CUDA is asked for on a machine without
one."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinyhun
from tinyhun import TinyhunError

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "weights" / "tiny-hunyuan"
SIM = {"NUMBA_ENABLE_CUDASIM": "1", "TINYHUN_CUDA_TESTS": "1"}


def start_simulated(folder, **popen):
    """The four files in one subprocess, started by conftest.py when collection ends (see the background mark)."""
    files = ("test_cuda_kernels.py", "test_cuda_attention.py", "test_cuda_model.py", "test_cuda_gpu_check.py")
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--basetemp",
                             str(folder / "tmp"), *(str(HERE / f) for f in files)],
                            text=True, env={**os.environ, **SIM}, cwd=HERE.parent, **popen)


@pytest.mark.slow
@pytest.mark.background(start=start_simulated, timeout=900)
def test_cuda_kernels_model_and_gpu_check_under_the_simulator(background):
    r = background
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_cuda_without_a_gpu_is_one_clear_error():
    """Here (no simulator in this process) a machine without a GPU gets one TinyhunError line, before any load."""
    from numba import cuda
    if cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TinyhunError, match=r"^device 'cuda': no CUDA GPU or driver found") as e:
        tinyhun.load(TINY, device="cuda")
    assert "\n" not in str(e.value)
    with pytest.raises(TinyhunError, match="expected one of cpu, cuda"):
        tinyhun.load(TINY, device="tpu")


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve", "--port", "18099"]])
def test_cli_device_cuda_without_a_gpu_exits_2_with_one_line(command):
    """serve too exits at once (it loads the model behind /health, but checks the GPU first, as the folder)."""
    from numba import cuda
    if cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "tinyhun.cli", *command, "--model", str(TINY), "--device", "cuda"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("tinyhun: error: device 'cuda': no CUDA GPU or driver found")
