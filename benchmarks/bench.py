"""Shared code of the benchmarks: environment records, synchronised timers, random-weight models, the episode
loop of the training job (G games x N sequential steps -> one PPO step per learner), the FLOP and byte model of an
episode, and JSON results.

Units are in the key names: `_s` seconds, `_gb` 1e9 bytes, `_tflops` 1e12 FLOP/s, `_per_s` per second.
`python -m benchmarks.bench [RESULTS_DIR]` prints the Markdown tables of RESULTS.md from the JSON files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import re
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GB = 1e9
SCORES = (-6.0, -3.0, 0.0, 3.0)  # rewards of the job's moral / illegal outcomes; their values do not affect timing


# ------------------------------------------------------------------------------------------------ environment
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_isa() -> str:
    """The widest matrix instructions torch can use on this CPU: amx, avx512-bf16, avx512, avx2 or '' (unknown).
    Machines sold under one model name differ here, and with it the fastest dtype and every timing."""
    checks = (("amx", "_is_amx_tile_supported"), ("avx512-bf16", "_is_avx512_bf16_supported"),
              ("avx512", "_is_avx512_supported"), ("avx2", "_is_avx2_supported"))
    for name, check in checks:
        try:
            if getattr(torch.cpu, check)():
                return name
        except AttributeError:
            continue
    return ""


def results_file(device: torch.device, suffix: str = "") -> str:
    """File name of a device's results: cpu-<cpu model>-<cpu_isa>.json, cuda-<gpu name>.json."""
    device = torch.device(device)
    name = device_name(device) + (f" {cpu_isa()}" if device.type == "cpu" else "")
    return f"{device.type}-{slug(name)}{suffix}.json"


@dataclass(frozen=True)
class CpuTimes:
    """Seconds since boot: wall clock, CPU time all processes spent busy and lost to the hypervisor (steal), summed
    over cores (from /proc/stat), and CPU time of this process and its waited-for children."""
    wall: float
    busy: float
    steal: float
    own: float


def cpu_times() -> CpuTimes | None:
    """Now's CpuTimes, or None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()
    return CpuTimes(wall=time.monotonic(), busy=(user + nice + system + irq + softirq) / tick, steal=steal / tick,
                    own=own.user + own.system + own.children_user + own.children_system)


def cpu_load_between(start: CpuTimes | None, end: CpuTimes | None) -> dict:
    """What else used the CPU between two CpuTimes, in cores kept busy on average: other processes, and the
    hypervisor's steal (time this virtual machine was ready to run but not given a core). {} if unknown."""
    if start is None or end is None or end.wall <= start.wall:
        return {}
    wall = end.wall - start.wall
    return {"other_processes_cores": round(max(0.0, (end.busy - start.busy) - (end.own - start.own)) / wall, 3),
            "steal_cores": round((end.steal - start.steal) / wall, 3), "over_s": round(wall, 1)}


IDLE_BELOW_CORES = 0.1
"""Other processes using less than a tenth of a core on average: the machine counts as idle."""


def load_note(load: dict) -> str:
    """One line for a results file saying whether the measurements had the machine to themselves."""
    if not load:
        return "machine load unknown (no /proc/stat)"
    others, steal = load["other_processes_cores"], load["steal_cores"]
    words = (f"machine idle (other processes used {others:.2f} cores on average)" if others < IDLE_BELOW_CORES
             else f"measured under load (other processes used {others:.2f} cores on average)")
    return words + (f"; the hypervisor withheld {steal:.2f} cores (steal)" if steal >= 0.01 else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - missing or broken package: record None
        return None


def environment(device: torch.device, compute_dtype: torch.dtype | None = None) -> dict:
    """Everything a figure depends on: device, precision, library versions, threads, machine load."""
    device = torch.device(device)
    env = {
        "device": str(device), "device_name": device_name(device),
        "compute_dtype": str(compute_dtype).replace("torch.", "") if compute_dtype is not None else None,
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": _version("transformers"),
        "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes"), "accelerate": _version("accelerate"),
        "cpu": cpu_name(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(device)),
                    "gpu_memory_gb": round(props.total_memory / GB, 2),
                    "multiprocessors": props.multi_processor_count})
    else:
        try:
            from ppo_core.model import cpu_has_native_bf16
            env["cpu_native_bf16"] = cpu_has_native_bf16()
        except ImportError:
            pass
    return env


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ------------------------------------------------------------------------------------------------------ timing
class Clock:
    """Wall-clock regions that synchronise the device on entry and exit (device work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def region(self, totals: dict, key: str):
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            totals[key] += time.perf_counter() - t


def wall_times_s(fn, n: int = 5) -> list[float]:
    """Wall times of `n` calls of `fn` on the CPU, after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_s(fn, n: int = 5) -> float:
    """Median wall time of `n` calls of `fn` on the CPU, after one warm-up call."""
    return statistics.median(wall_times_s(fn, n))


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def saved_graph_mb(fn, params) -> tuple[object, float]:
    """Run fn() and measure the memory its autograd graphs save for backward: MB of the distinct storages the
    graphs keep, model parameters excluded (they exist anyway). Returns (fn's result, MB)."""
    own = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(kept.values()) / 1e6


def free_memory(device: torch.device | None = None) -> None:
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_ceilings(device: torch.device, dtype: torch.dtype, size: int | None = None) -> dict:
    """The two ceilings of the floor: one large matrix product in the compute dtype, laid out as in nn.Linear
    (FLOP/s), and one large device-to-device copy (bytes read + written per second); medians of timed repeats after
    warm-up, random data. (The layout matters on CPUs without native bf16: `python -m benchmarks.forward_cost --dtype
    bf16` times a bf16 `x @ W.T` at 13-19 GFLOP/s there and `grad @ W` at about 2; RESULTS.md.)"""
    device = torch.device(device)
    clock = Clock(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    reps = 10 if device.type == "cuda" else 3

    def timed(fn) -> float:
        fn()
        fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                clock.sync()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    mm_s = timed(lambda: torch.nn.functional.linear(a, b))
    del a, b
    count = (2 ** 30 if device.type == "cuda" else 2 ** 26) // 4
    src = torch.rand(count, device=device, generator=g)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    del src, dst
    free_memory(device)
    return {"matmul_n": n, "matmul_dtype": dtype_name(dtype), "matmul_tflops": 2 * n ** 3 / mm_s / 1e12,
            "copy_bytes": 2 * count * 4, "copy_tb_per_s": 2 * count * 4 / copy_s / 1e12}


# ------------------------------------------------------------------------------------------------------ models
GEMMA2_SHAPES = {  # the published architectures (config.json of google/gemma-2-2b-it and gemma-2-9b-it)
    "gemma-2-2b": dict(num_hidden_layers=26, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, vocab_size=256000),
    "gemma-2-9b": dict(num_hidden_layers=42, hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, vocab_size=256000),
    # a few-MB stand-in with the same code paths (soft-capping, sliding-window layers shorter than the prompt)
    "tiny-gemma-2": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=512),
}


def gemma2_config(name: str):
    """transformers.Gemma2Config of a Gemma-2 architecture (random weights are built from it; nothing downloaded)."""
    from transformers import Gemma2Config
    shape = dict(GEMMA2_SHAPES[name])
    tiny = name.startswith("tiny")
    return Gemma2Config(
        **shape, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        sliding_window=32 if tiny else 4096, query_pre_attn_scalar=shape["head_dim"] if tiny else 256,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=1024 if tiny else 8192, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True)


def build_random_checkpoint(config, folder: str, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0) -> dict:
    """Random-weight causal LM from `config`, saved with save_pretrained to `folder` (so that it loads through
    ppo_core.load_causal_lm exactly like a downloaded model). Built on `device` when it fits, else on the CPU."""
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    torch.manual_seed(seed)
    built_on = torch.device(device)
    try:
        with built_on:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    except (RuntimeError, torch.OutOfMemoryError):
        free_memory(built_on)
        built_on = torch.device("cpu")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    free_memory(device)
    return {"model_params": params, "built_on": str(built_on), "build_and_save_s": time.perf_counter() - t}


def load_policy(folder: str, device: torch.device, adapters=("agent",), lora=None, quantize: str = "4bit",
                dtype: torch.dtype | None = None, attn_implementation: str | None = "eager"):
    """The job's model stack: load_causal_lm (4-bit NF4 by default) -> PolicyModel with LoRA adapters and value
    heads, compute dtype as the device gives it."""
    from ppo_core import LoraSettings, PolicyModel, compute_dtype_for, load_causal_lm
    dtype = dtype or compute_dtype_for(device)
    lm = load_causal_lm(folder, quantize=quantize, device=device, dtype=dtype,
                        attn_implementation=attn_implementation)
    return PolicyModel(lm, adapters=tuple(adapters), lora=lora or LoraSettings(), compute_dtype=dtype)


def ppo_config(batch_size: int, seed: int = 0, **changes):
    """The job's PPO settings (moral.config.ppo_config: one optimiser step per episode) for `batch_size` samples."""
    from moral.config import RunConfig, ppo_config as run_ppo_config
    return run_ppo_config(RunConfig(steps=batch_size), seed=seed, **changes)


# ------------------------------------------------------------------------------------------------ FLOP model
@dataclass(frozen=True)
class Dims:
    """Matrix shapes of a Llama/Gemma-style decoder (gated MLP) with LoRA rank r on all seven linear layers."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_r: int

    @classmethod
    def from_config(cls, config, lora_r: int) -> "Dims":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   c.num_key_value_heads, head_dim, c.vocab_size, lora_r)

    @property
    def _io(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def p_lin(self) -> int:
        """Frozen matmul parameters per layer."""
        return sum(a * b for a, b in self._io)

    @property
    def p_lora(self) -> int:
        """LoRA parameters per layer: r x (in + out) per linear."""
        return sum(self.lora_r * (a + b) for a, b in self._io)

    @property
    def p_qkv(self) -> int:
        return sum(a * b for a, b in self._io[:3])

    def forward(self, tokens: int, attn_pairs: int, head_rows: int = 0, value_rows: int = 0,
                lora: bool = True) -> int:
        """FLOPs of a forward pass: `tokens` token rows through every layer, `attn_pairs` (query, key) pairs per
        head that the attention scores (T^2 for an eager prefill of T tokens, c for one decode row with c cached
        keys), the LM head on `head_rows` rows and the value head on `value_rows` rows."""
        per_layer = 2 * (self.p_lin + (self.p_lora if lora else 0)) * tokens \
            + 4 * self.heads * self.head_dim * attn_pairs
        return self.layers * per_layer + 2 * self.hidden * self.vocab * head_rows + 2 * self.hidden * value_rows

    def backward(self, tokens: int, attn_pairs: int, head_rows: int = 0, value_rows: int = 0) -> int:
        """FLOPs of the backward pass with a frozen base: input gradients through every frozen matmul (2 x p_lin
        per token), input + weight gradients of LoRA (4 x p_lora), attention backward (2 x its forward), the LM
        head's input gradient; layer 0's q/k/v need no input gradient (the embeddings are frozen)."""
        per_layer = (2 * self.p_lin + 4 * self.p_lora) * tokens + 8 * self.heads * self.head_dim * attn_pairs
        first_layer_qkv = (2 * self.p_qkv + 2 * 3 * self.lora_r * self.hidden) * tokens
        return (self.layers * per_layer - first_layer_qkv + 2 * self.hidden * self.vocab * head_rows
                + 4 * self.hidden * value_rows)

    def weight_bytes(self, quantize: str, dtype_bytes: int, lora: bool = True, head: bool = True) -> float:
        """Bytes of weights one pass over the model reads: frozen linears (NF4: 0.5 B + one fp32 absmax per 64),
        fp32 LoRA factors, and the (tied) LM head in the compute dtype."""
        per_param = {"4bit": 0.5 + 4 / 64, "8bit": 1 + 4 / 64}.get(quantize, dtype_bytes)
        total = self.layers * self.p_lin * per_param
        if lora:
            total += self.layers * self.p_lora * 4
        if head:
            total += self.vocab * self.hidden * dtype_bytes
        return total


class Work:
    """FLOPs and weight bytes an episode must spend, counted from what actually ran (distinct prefills, decode rows,
    reference misses, fused or recomputed loss forward)."""

    def __init__(self, dims: Dims, quantize: str, dtype_bytes: int):
        self.dims, self.quantize, self.dtype_bytes = dims, quantize, dtype_bytes
        self.flops = 0
        self.bytes = 0.0

    def _pass(self, lora: bool = True, backward: bool = False) -> None:
        b = self.dims.weight_bytes(self.quantize, self.dtype_bytes, lora=lora)
        if backward:  # weights read again, LoRA gradients written
            b += self.dims.layers * self.dims.p_lora * 4
        self.bytes += b

    def sampling(self, distinct: int, prompt_len: int, rows: int, gen_len: int, grad: bool) -> None:
        """One sampling call: prefill of the distinct queries (LM head on their last rows), then gen_len - 1
        KV-cached decode steps on all rows; with grad (fused rollout) also its backward."""
        d, L = self.dims, prompt_len
        values = distinct if grad else 0
        self.flops += d.forward(distinct * L, distinct * L * L, distinct, values)
        self._pass()
        if grad:
            self.flops += d.backward(distinct * L, distinct * L * L, distinct, values)
            self._pass(backward=True)
        for t in range(1, gen_len):
            values = rows if grad else 0
            self.flops += d.forward(rows, rows * (L + t), rows, values)
            self._pass()
            if grad:
                self.flops += d.backward(rows, rows * (L + t), rows, values)
                self._pass(backward=True)

    def full_sequences(self, count: int, padded_len: int, response_len: int, *, lora: bool = True,
                       values: bool = True, backward: bool = False, passes: int = 1) -> None:
        """`count` right-padded sequences through the model (reference / old log-probs / training forward), LM and
        value heads on the response rows only; optionally with their backward."""
        if count == 0:
            return
        d, T = self.dims, padded_len
        rows = count * response_len
        self.flops += d.forward(count * T, count * T * T, rows, rows if values else 0, lora=lora)
        for _ in range(passes):
            self._pass(lora=lora)
        if backward:
            self.flops += d.backward(count * T, count * T * T, rows, rows if values else 0)
            for _ in range(passes):
                self._pass(backward=True)

    def optimizer(self) -> None:
        """Adam over the LoRA factors: read param, grad, two moments; write param, two moments (fp32)."""
        self.bytes += self.dims.layers * self.dims.p_lora * 4 * 7


def floor_seconds(flops: float, nbytes: float, ceilings: dict) -> dict:
    """Time under which no version of the episode can run: its FLOPs at the measured matmul rate, its weight
    bytes at the measured copy bandwidth; the larger of the two is the floor."""
    flop_s = flops / (ceilings["matmul_tflops"] * 1e12)
    byte_s = nbytes / (ceilings["copy_tb_per_s"] * 1e12)
    return {"flop_floor_s": flop_s, "byte_floor_s": byte_s, "floor_s": max(flop_s, byte_s),
            "bound": "compute" if flop_s >= byte_s else "memory"}


# ----------------------------------------------------------------------------------------------- the episode
# Where the job's 16 training prompts part (SmolLM2's tokenizer, 231 tokens each): all share their first 17% of
# tokens, then 2 branches each to 60%, 4 to 87%, 16 to the end; a tree of 978 nodes against 3,696 tokens, as
# measured (ppo_core.tree.tree_size over the 16 prompts).
PROMPT_TREE_SHAPE = ((0.173, 1), (0.602, 2), (0.866, 4), (1.0, 16))


def random_prompt_pool(count: int, length: int, vocab: int, device: torch.device, seed: int = 0,
                       bos: int = 2) -> list[torch.Tensor]:
    """`count` distinct prompts of random token ids (BOS first). 16 prompts (the job's 4 states x 2 x 2 option
    orders) share prefixes the way the job's prompts do (PROMPT_TREE_SHAPE), so that the prompt tree saves what it
    saves there; any other count gives independent prompts."""
    g = torch.Generator().manual_seed(seed)
    low = min(3, vocab - 1)

    def tokens(n):
        return torch.randint(low, vocab, (n,), generator=g)

    if count != 16:
        return [torch.cat([torch.tensor([bos]), tokens(length - 1)]).to(device) for _ in range(count)]
    branches = [torch.tensor([bos])]
    start = 1
    for fraction, width in PROMPT_TREE_SHAPE:
        end = max(start, round(fraction * length))
        branches = [torch.cat([branches[i * len(branches) // width], tokens(end - start)]) for i in range(width)]
        start = end
    return [b.to(device) for b in branches]


@dataclass
class Workload:
    games: int = 1
    """G: games played side by side; their answers are sampled in one call per step."""
    steps: int = 5
    """N: sequential steps per episode (5 vs a fixed opponent, 3 vs another learner)."""
    gen_len: int = 2
    """Sampled answer tokens: 2 in the paper ("action1"), 1 with the answer prefix."""
    prompt_len: int = 200
    pool: int = 16
    """Distinct prompts drawn from."""
    greedy: bool = False
    """Greedy answers (top_k=1), so that a draft can follow them (random weights answer nothing legal)."""
    draft: bool = False
    """Draft the first tokens of the answers seen so far (every greedy draw then follows one, as for a model that
    answers with the actions' own tokens, the codec's draft); greedy only."""


def run_episode(trainers: dict, pool: list[torch.Tensor], work: Workload, rng: random.Random, clock: Clock,
                totals: dict, dims: Dims | None = None, quantize: str = "4bit", dtype_bytes: int = 2,
                drafts: dict | None = None) -> dict:
    """A synthetic episode of the job's shape for models without a tokenizer (the GPU suite's random-weight Gemma-2):
    N steps; at each step every learner answers G prompts drawn from `pool` in one generate call; then one PPO step
    per learner on its G x N samples with random scores. The real episode (prompts, games, rewards) is
    moral.finetune.FineTuning.run_episode, which the CPU benchmark times. Returns timings, PPO timings and counted
    work; set trainer.sync_timing for device-synchronised PPO timings (run_case does). drafts (Workload.draft
    only): {learner: set of answer starts}, grown with each answer and kept across episodes by the caller."""
    policies = list({id(t.policy): t.policy for t in trainers.values()}.values())  # learners may share one
    passes_before = sum(p.backbone_passes for p in policies)
    for key in ("generation_s", "step_s"):
        totals[key] = 0.0
    batches = {name: ([], [], []) for name in trainers}
    distinct = {name: [] for name in trainers}  # prefills per generate call
    memoised = {name: set() for name in trainers}
    clock.sync()
    t0 = time.perf_counter()
    for _ in range(work.steps):
        for name, trainer in trainers.items():
            idx = [rng.randrange(len(pool)) for _ in range(work.games)]
            queries = [pool[i] for i in idx]
            options = {"top_k": 1} if work.greedy else {}
            if work.draft:
                options["draft"] = sorted(drafts[name])
            with clock.region(totals, "generation_s"):
                rollout = trainer.generate(queries, max_new_tokens=work.gen_len, **options)
            if work.draft:
                drafts[name].update(tuple(r[:1].tolist()) for r in rollout.responses)
            q, r, s = batches[name]
            q.extend(queries)
            r.extend(rollout.responses)
            s.extend(rng.choice(SCORES) for _ in idx)
            if work.gen_len == 1:
                # one-token answers: the trainer memoises each prefill until its optimiser step
                distinct[name].append(len(set(idx) - memoised[name]))
                memoised[name].update(idx)
            else:
                distinct[name].append(len(set(idx)))
    stats, misses = {}, {}
    for name, trainer in trainers.items():
        before = trainer.reference_cache.misses
        with clock.region(totals, "step_s"):
            stats[name] = trainer.step(*batches[name])
        misses[name] = trainer.reference_cache.misses - before
    clock.sync()
    record = {"episode_s": time.perf_counter() - t0, **dict(totals)}
    # the trainer's own synchronised timings (PPOTrainer.sync_timing): reference pass; backward + optimiser steps
    record["reference_s"] = sum(st["time/ppo/reference"] for st in stats.values())
    record["backward_optimizer_s"] = sum(st["time/ppo/optimize_step"] for st in stats.values())
    record["step_other_s"] = record["step_s"] - record["reference_s"] - record["backward_optimizer_s"]
    host = defaultdict(float)
    for st in stats.values():
        for k, v in st.items():
            if k.startswith("time/ppo/"):
                host[k] += v
    record["host_timing"] = dict(host)
    record["fused_rollout"] = min(st.get("ppo/fused_rollout", 0.0) for st in stats.values())
    record["ref_cache_misses"] = sum(misses.values())
    record["ref_cache_hit_rate"] = 1 - record["ref_cache_misses"] / (len(trainers) * work.games * work.steps)
    record["loss_finite"] = all(torch.isfinite(torch.tensor(st["ppo/loss/total"])).item() for st in stats.values())
    record["skipped_steps"] = sum(st.get("ppo/skipped_steps", 0.0) for st in stats.values())
    record["oom_backoffs"] = sum(st.get("ppo/oom_backoffs", 0.0) for st in stats.values())
    record["distinct_prefills"] = sum(sum(v) for v in distinct.values())
    record["tokens_computed"] = sum(st["ppo/tokens_computed"] for st in stats.values())
    record["backbone_passes"] = sum(p.backbone_passes for p in policies) - passes_before
    tree = any(trainer.policy.tree_supported for trainer in trainers.values())
    if dims is not None and not tree:  # the FLOP model counts the padded computation
        w = Work(dims, quantize, dtype_bytes)
        L, R = work.prompt_len, work.gen_len
        for name, trainer in trainers.items():
            fused = bool(stats[name].get("ppo/fused_rollout", 0.0))
            for u in distinct[name]:
                w.sampling(u, L, work.games, R, grad=fused)
            pad = trainer.shortcuts.pad_multiple
            padded = -(-(L + R) // pad) * pad
            w.full_sequences(misses[name], padded, R, lora=False, values=False)
            if not fused:  # old log-probs (no grad), then the loss's forward + backward, all samples
                n = work.games * work.steps
                w.full_sequences(n, padded, R)
                w.full_sequences(n, padded, R, backward=True)
            w.optimizer()
        record["flops"] = w.flops
        record["weight_bytes"] = w.bytes
    return record


def greedy_starts(trainer, pool: list[torch.Tensor]) -> set[tuple[int]]:
    """Every pool prompt's greedy first token under the trainer's adapter, in one no-grad pass (Workload.draft starts
    from these; later answers are added as they come)."""
    from ppo_core import sample
    with torch.no_grad(), trainer.policy.adapter(trainer.adapter):
        rollout = sample(trainer.policy, pool, max_new_tokens=1, top_k=1, temperature=trainer.config.temperature)
    return {tuple(r.tolist()) for r in rollout.responses}


def run_case(trainers: dict, pool: list[torch.Tensor], work: Workload, *, warmup: int, measured: int,
             clock: Clock, seed: int = 0, dims: Dims | None = None, quantize: str = "4bit", dtype_bytes: int = 2,
             ceilings: dict | None = None, log=None) -> dict:
    """Warm-up episodes, then `measured` episodes; medians of every timing, work-based rates and floors."""
    rng = random.Random(seed)
    totals = defaultdict(float)
    for trainer in trainers.values():
        trainer.sync_timing = True
    device = clock.device
    drafts = {name: greedy_starts(trainer, pool) for name, trainer in trainers.items()} if work.draft else {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None
    records = []
    for i in range(warmup + measured):
        rec = run_episode(trainers, pool, work, rng, clock, totals, dims, quantize, dtype_bytes, drafts)
        if log:
            log(f"    episode {i + 1}/{warmup + measured}{' (warm-up)' if i < warmup else ''}: "
                f"{rec['episode_s']:.3f} s, fused={rec['fused_rollout']:.0f}")
        if i >= warmup:
            records.append(rec)
    s = med(r["episode_s"] for r in records)
    n_learners = len(trainers)
    steps = work.games * work.steps
    out = {
        "games": work.games, "steps": work.steps, "gen_len": work.gen_len, "prompt_len": work.prompt_len,
        "prompt_pool": work.pool, "learners": n_learners, "warmup_episodes": warmup, "measured_episodes": measured,
        "s_per_episode": s, "s_per_episode_spread": spread(r["episode_s"] for r in records),
        "generation_s": med(r["generation_s"] for r in records),
        "reference_s": med(r["reference_s"] for r in records),
        "backward_optimizer_s": med(r["backward_optimizer_s"] for r in records),
        "step_s": med(r["step_s"] for r in records),
        "step_other_s": med(r["step_other_s"] for r in records),
        "host_timing_s": {k: med(r["host_timing"].get(k) for r in records) for k in records[0]["host_timing"]},
        "game_steps_per_s": steps / s,
        "tokens_per_s": n_learners * steps * (work.prompt_len + work.gen_len) / s,
        "generated_tokens_per_s": n_learners * steps * work.gen_len / s,
        "fused_rollout": min(r["fused_rollout"] for r in records),
        "ref_cache_hit_rate": med(r["ref_cache_hit_rate"] for r in records),
        "distinct_prefills_per_episode": med(r["distinct_prefills"] for r in records),
        "tokens_computed_per_episode": med(r["tokens_computed"] for r in records),
        "backbone_passes_per_episode": med(r["backbone_passes"] for r in records),
        "prompt_tree": any(t.policy.tree_supported for t in trainers.values()),
        "losses_finite": all(r["loss_finite"] for r in records),
        "skipped_steps": max(r["skipped_steps"] for r in records),
        "oom_backoffs": max(r["oom_backoffs"] for r in records),
    }
    if device.type == "cuda":
        out["resident_gb"] = resident
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
    else:
        out["peak_rss_gb_process"] = peak_rss_gb()
    if dims is not None and "flops" in records[0]:
        total_s = sum(r["episode_s"] for r in records)
        flops = sum(r["flops"] for r in records)
        nbytes = sum(r["weight_bytes"] for r in records)
        out["flops_per_episode"] = flops / len(records)
        out["weight_bytes_per_episode"] = nbytes / len(records)
        out["achieved_tflops"] = flops / total_s / 1e12
        if ceilings:
            floor = floor_seconds(flops / len(records), nbytes / len(records), ceilings)
            out.update({k: v for k, v in floor.items()})
            out["floor_over_measured"] = floor["floor_s"] / (total_s / len(records))
            out["achieved_over_matmul_rate"] = out["achieved_tflops"] / ceilings["matmul_tflops"]
    return out


def release(trainers: dict, device: torch.device) -> None:
    """Drop trainers (Adam state, kept graphs) and the adapters' gradients."""
    for trainer in trainers.values():
        trainer.optimizer.zero_grad(set_to_none=True)
        for p in trainer.params:
            p.grad = None
        discard = getattr(trainer, "discard_rollouts", None) or getattr(trainer, "_forget_rollouts", None)
        if discard is not None:  # drop kept sampling graphs
            discard()
    trainers.clear()
    free_memory(device)


# ----------------------------------------------------------------------------------------------------- results
def write_json(path: str, data: dict) -> None:
    from moral.runio import write_json_atomic
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, data, sort_keys=False, default=_jsonable, trailing_newline=True)


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def merge_cases(path: str, header: dict, cases: dict) -> dict:
    """Update `path` with new cases (other cases already there are kept, so a partial run adds to a full one)."""
    data = {}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
    data.update(header)
    data.setdefault("cases", {}).update(cases)
    write_json(path, data)
    return data


# ---------------------------------------------------------------------------------------------- Markdown summary
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_summary(folder: str = RESULTS_DIR) -> str:
    """Tables of every results file in `folder`."""
    parts = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                parts.append(render_results(json.load(f), name))
    return "\n".join(parts)


def render_results(data: dict, title: str = "results") -> str:
    """Markdown tables of one results file (CPU cases or GPU models)."""
    env = data.get("environment", {})
    lines = [f"### {title}", "",
             f"{env.get('device_name')}{' (' + env['cpu_isa'] + ')' if env.get('cpu_isa') else ''} · "
             f"torch {env.get('torch')} · transformers {env.get('transformers')} · "
             f"peft {env.get('peft')} · bitsandbytes {env.get('bitsandbytes')} · "
             + (f"compute dtype {env['compute_dtype']} · " if env.get("compute_dtype") else "")
             + f"threads {env.get('torch_threads')} · load average {env.get('loadavg_1_5_15')}"
             + (f" (at start {env['loadavg_at_start_1_5_15']})" if env.get("loadavg_at_start_1_5_15") else "")
             + f" · {env.get('time_utc')}", ""]
    if data.get("note"):
        lines += [f"Note: {data['note']}", ""]
    if data.get("command"):
        lines += [f"Command: `{data['command']}`", ""]
    if "ceilings" in data:
        c = data["ceilings"]
        lines += [f"Ceilings: {c['matmul_dtype']} matmul {_fmt(c['matmul_tflops'])} TFLOP/s, "
                  f"copy {_fmt(c['copy_tb_per_s'])} TB/s", ""]
    for model, block in data.get("models", {}).items():
        lines += [f"**{model}** ({block.get('quantize')}, compute {block.get('compute_dtype')}, "
                  f"LoRA r={block.get('lora_r')}, resident {_fmt(block.get('resident_gb'))} GB)", "",
                  "| case | G | N | gen | s/episode | generation s | reference s | backward+opt s | "
                  "game steps/s | tokens/s | peak GB | TFLOP/s | floor/measured | fused |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case, r in block.get("cases", {}).items():
            if "error" in r:
                lines.append(f"| {case} | {r.get('games')} | | | {r['error']} | | | | | | | | | |")
                continue
            lines.append(
                f"| {case} | {r['games']} | {r['steps']} | {r['gen_len']} | {_fmt(r['s_per_episode'])} | "
                f"{_fmt(r['generation_s'])} | {_fmt(r['reference_s'])} | {_fmt(r['backward_optimizer_s'])} | "
                f"{_fmt(r['game_steps_per_s'])} | {_fmt(r['tokens_per_s'])} | {_fmt(r.get('peak_mem_gb'))} | "
                f"{_fmt(r.get('achieved_tflops'))} | {_fmt(r.get('floor_over_measured'))} | "
                f"{_fmt(bool(r['fused_rollout']))} |")
        if block.get("targets"):
            lines += ["", "| target | limit | measured | met |", "|---|---|---|---|"]
            for t, v in block["targets"].items():
                lines.append(f"| {t} | {v['limit']} | {_fmt(v['measured'])} | {_fmt(v['met'])} |")
        if block.get("error"):
            lines.append(f"error: {block['error']}")
        lines.append("")
    if data.get("cases"):
        lines += ["| case | dtype | what | median s | min–max s (n) |", "|---|---|---|---|---|"]
        for case, r in data["cases"].items():
            for what, v in r.get("timings_s", {}).items():
                lines.append(f"| {case} | {r.get('dtype')} | {what} | {_fmt(v.get('median'))} | "
                             f"{_fmt(v.get('min'))}–{_fmt(v.get('max'))} ({v.get('n')}) |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_summary(sys.argv[1] if len(sys.argv) > 1 else RESULTS_DIR))
