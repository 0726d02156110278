"""Benchmark options and shared fixtures.

`pytest benchmarks/` runs the CPU half (tiny model, embedded SmolLM2-135M-Instruct, the main job's episode, and a dry
run of the GPU code path on a tiny Gemma-2) and records results in benchmarks/results/cpu-<cpu>-<isa>.json.
`pytest benchmarks/ --gpu` runs the CUDA half instead (Gemma-2 architectures, random weights, 4-bit) and records
benchmarks/results/cuda-<gpu>.json. Neither half is part of `pytest tests` (testpaths = tests).
"""

import os
import sys

import pytest
import torch

from benchmarks import bench


def pytest_addoption(parser):
    group = parser.getgroup("benchmarks")
    group.addoption("--gpu", action="store_true", default=False,
                    help="run the CUDA benchmarks instead of the CPU ones (fails if no CUDA device is visible)")
    group.addoption("--gpu-models", default="gemma-2-2b",
                    help="comma-separated Gemma-2 architectures for --gpu: gemma-2-2b, gemma-2-9b")
    group.addoption("--bench-out", default=bench.RESULTS_DIR, help="folder of the results JSON files")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads for the CPU benchmarks (default: torch's default)")
    group.addoption("--bench-emulated-bf16", action="store_true", default=False,
                    help="run the bf16 SmolLM2 case on CPUs without bf16 instructions too (emulated: about 8 min)")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="fewer episodes per GPU case (1 warm-up + 2 measured)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_benchmark: CPU benchmark (pytest benchmarks/, without --gpu)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (benchmarks/ with --gpu)")
    if config.getoption("--gpu", default=False):
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"--gpu: no CUDA device is visible (torch {torch.__version__}, torch.cuda.is_available() is False); "
                f"run `pytest benchmarks/` without --gpu for the CPU benchmarks")
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise pytest.UsageError(
                f"--gpu: bitsandbytes cannot be imported ({exc!r}); on the lent GPU machine run "
                f"../shared/tools/gpu-carry.sh first, carry .gpu_site and export PYTHONPATH=$PWD/.gpu_site:$PWD")


def pytest_collection_modifyitems(config, items):
    gpu = config.getoption("--gpu")
    for item in items:
        if gpu and "cpu_benchmark" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="CPU benchmark: run pytest benchmarks/ without --gpu"))
        elif not gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="CUDA benchmark: run pytest benchmarks/ --gpu"))


def command_line(config) -> str:
    return " ".join(["pytest", *config.invocation_params.args])


@pytest.fixture(scope="session", autouse=True)
def bench_threads(request):
    threads = request.config.getoption("--bench-threads")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield torch.get_num_threads()
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cpu_record(request):
    """Collects CPU cases; at the end of the session they are merged into <bench-out>/cpu-<cpu name>-<isa>.json."""
    cases = {}
    start_load, start_times = [round(x, 2) for x in os.getloadavg()], bench.cpu_times()
    yield cases
    if not cases:
        return
    device = torch.device("cpu")
    env = bench.environment(device)
    env["loadavg_at_start_1_5_15"] = start_load
    env["nice"] = os.nice(0)
    load = bench.cpu_load_between(start_times, bench.cpu_times())
    env["cpu_load"] = load
    header = {"suite": "cpu", "command": command_line(request.config), "environment": env,
              "note": bench.load_note(load)}
    path = os.path.join(request.config.getoption("--bench-out"), bench.results_file(device))
    bench.merge_cases(path, header, cases)
    sys.stdout.write(f"\nCPU benchmark results: {path}\n")
