"""The one-GPU steps of the prepared GPU check (bench/gpu_check.py runs each in a child python of its own).

Each returns a dict with a one-line `detail` and what it measured, or raises CheckFailed after running all
its comparisons. The model steps use the bundled model (models/glm-bilingual, `glm.api.load`) on the
prompts whose greedy infills tests/test_bundled_model.py checks (tools/ship_model.py): greedy tokens
(`fill_blanks`, top-k 1) and the logits of every prompt's context. Tolerances, on max |CUDA - CPU| /
max |CPU| of those logits:
- fp32 on CUDA (TF32 off) against the CPU: FP32_TOLERANCE, and the tokens must be equal;
- INT8 / INT4 / INT4 group 128 in fp16 on CUDA against the same quantization in fp32 on the CPU:
  QUANTIZED_TOLERANCE (the INT4 kernel of sm_80+ computes in bf16); differing tokens are reported with the
  first difference, not failed (a near tie may flip under fp16 / bf16).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bench.gpu_check import ROOT, CheckFailed

if TYPE_CHECKING:
    from glm.loading import Transform
    from glm.model import GLM
    from glm.tokenizer import GLMTokenizer

FP32_TOLERANCE = 1e-3
QUANTIZED_TOLERANCE = 5e-2
KERNEL_TOLERANCE = (
    1e-2  # a kernel's output against F.linear on the dequantised weight (tests/test_quantization)
)
SCHEMES = {"int8": (8, "row", None), "int4": (4, "row", None), "int4-g128": (4, "group", 128)}
# Peak memory may exceed the planner's (device weights + KV cache + activations) by this much: allocator
# rounding, the engine's masks and the strategy's logits copies (the planner does not count them).
PEAK_SLACK = (0.05, 4 * 2**20)  # (fraction, bytes)
MIB = 2**20


def finish(detail: str, data: dict[str, Any], failures: Sequence[str]) -> dict[str, Any]:
    """The step's result, or CheckFailed naming every failed check (with the data)."""
    if failures:
        raise CheckFailed("; ".join(failures), data)
    return {"detail": detail, **data}


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def first_difference(
    got: Sequence[Sequence[int]], want: Sequence[Sequence[int]], reference: str = "CPU"
) -> str | None:
    """Where two lists of token lists first differ ('prompt 2 token 7: 31 vs CPU 52'), or None."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if list(g) != list(w):
            j = next((k for k, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
            at = [s[j] if j < len(s) else "end" for s in (g, w)]
            return f"prompt {i} token {j}: {at[0]} vs {reference} {at[1]}"
    return None


def cuda() -> torch.device:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", 0)


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def load_bundled(
    device: str | torch.device, dtype: str, transforms: Sequence[Transform] = ()
) -> tuple[GLM, GLMTokenizer]:
    from glm.api import load

    return load(dtype=dtype, device=device, transforms=transforms)


def greedy(model: GLM, tokenizer: GLMTokenizer) -> list[list[int]]:
    from glm.decoding.infill import fill_blanks
    from tools.ship_model import GREEDY, GREEDY_PROMPTS

    return [answer.ids for (answer,) in fill_blanks(model, tokenizer, GREEDY_PROMPTS, GREEDY)]


def contexts(tokenizer: GLMTokenizer) -> list[tuple[list[int], int | None]]:
    """Each prompt's first context to generate from (ending in sop) and its mask position."""
    from glm.decoding.infill import prepare_query
    from tools.ship_model import GREEDY_PROMPTS

    out = []
    for text in GREEDY_PROMPTS:
        query = prepare_query(text, tokenizer)
        position = None if query.use_gmask else query.ids.index(query.mask_id)
        out.append(([*query.ids, tokenizer.sop_id], position))
    return out


@torch.no_grad()
def prompt_logits(model: GLM, tokenizer: GLMTokenizer) -> Tensor:
    """The logits at every position of every prompt's context, [positions, V] fp32 on the CPU."""
    from glm.query import context_inputs

    device, out = model.device, []
    for context, position in contexts(tokenizer):
        positions, mask = context_inputs(len(context), position)
        ids = torch.tensor([context], device=device)
        logits = model(ids, positions[None].to(device), mask[None, None].to(device))
        out.append(logits[0].float().cpu())
    return torch.cat(out)


def outputs(model: GLM, tokenizer: GLMTokenizer) -> tuple[list[list[int]], Tensor]:
    return greedy(model, tokenizer), prompt_logits(model, tokenizer)


def compare(got: tuple[list[list[int]], Tensor], want: tuple[list[list[int]], Tensor]) -> dict[str, Any]:
    difference = first_difference(got[0], want[0])
    return {
        "tokens_equal": difference is None,
        "first_difference": difference,
        "relative_logit_error": relative_error(got[1], want[1]),
        "generated_tokens": sum(map(len, got[0])),
    }


# ---- the steps


def versions() -> dict[str, Any]:
    """torch, CUDA, NCCL and every GPU with its compute capability; `gpus` gates the later steps."""
    data: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    data.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), gpus=0)
    head = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if not data["cuda_available"]:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        data["why_no_cuda"] = f"no CUDA: torch.cuda.is_available() is False ({why})"
        return {"detail": f"{head}; dry run, {data['why_no_cuda']}", **data}
    try:
        nccl = torch.cuda.nccl.version()
        data["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as error:  # a build without NCCL: the nccl step fails on it
        data["nccl"] = f"unavailable ({error})"
    data["cudnn"] = torch.backends.cudnn.version()
    data["gpus"] = torch.cuda.device_count()
    data["devices"] = []
    for index in range(data["gpus"]):
        p = torch.cuda.get_device_properties(index)
        data["devices"].append(
            {"name": p.name, "sm": f"sm_{p.major}{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        )
    kinds = collections.Counter(f"{d['name']} ({d['sm']}, {d['memory_gib']} GiB)" for d in data["devices"])
    gpus = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    return {"detail": f"{head}, NCCL {data['nccl']}, {gpus}", **data}


def nccl_smoke() -> dict[str, Any]:
    """A one-rank NCCL process group on 127.0.0.1 and an all_reduce."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        raise CheckFailed("this torch has no NCCL backend (torch.distributed.is_nccl_available() is False)")
    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout
    )
    try:
        x = torch.arange(4, dtype=torch.float32, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        got = x.tolist()
    finally:
        dist.destroy_process_group()
    failures = (
        [] if got == [0.0, 1.0, 2.0, 3.0] else [f"all_reduce over one rank changed [0, 1, 2, 3] to {got}"]
    )
    return finish(f"nccl world size 1 on 127.0.0.1: all_reduce gave {got}", {"all_reduce": got}, failures)


def pytest_cuda() -> dict[str, Any]:
    """`pytest -m cuda` on the test files that have CUDA tests."""
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs", *files]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(run.stdout, run.stderr, sep="\n", flush=True)  # the log
    lines = [line.strip("= ") for line in run.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    failures = [] if run.returncode == 0 else [f"pytest exited with status {run.returncode}: {last}"]
    if run.returncode == 0 and "passed" not in last:
        failures.append(f"no CUDA test passed: {last}")
    data = {"command": " ".join(command), "returncode": run.returncode, "result": last}
    return finish(f"pytest -m cuda ({len(files)} file(s)): {last}", data, failures)


def kernel() -> dict[str, Any]:
    """bench/quantization_cuda.py's kernel rows: GLM-130B TP-8 layer shapes, times and memory deltas."""
    from bench.quantization_cuda import SPECS, gpu_info, kernel_rows

    device = cuda()
    info, rows = gpu_info(device), kernel_rows(device)
    failures = []
    for row, label in ((r, label) for r in rows for label in SPECS):
        where = f"{row['layer']} x {row['rows']} rows {label}"
        if not row[f"{label}_rel_err"] <= KERNEL_TOLERANCE:
            failures.append(f"{where}: relative error {row[f'{label}_rel_err']:.2g} > {KERNEL_TOLERANCE}")
        if not row[f"{label}_vs_fp16"] < 1:
            failures.append(f"{where}: holds {row[f'{label}_vs_fp16']:.2f} x the fp16 weight's memory")
    big = next(r for r in rows if r["layer"] == "h_to_4h" and r["rows"] == 1)
    times = ", ".join(f"{label} {big[f'{label}_ms']:.3f}" for label in ("fp16", *SPECS))
    memory = ", ".join(f"{label} {big[f'{label}_vs_fp16']:.2f}" for label in SPECS)
    detail = (
        f"fused INT4 {info['fused_int4']}; h_to_4h, 1 row, ms: {times}; memory x fp16: {memory}; "
        f"max rel error {max(r[f'{label}_rel_err'] for r in rows for label in SPECS):.1e}"
    )
    return finish(detail, {**info, "tolerance": KERNEL_TOLERANCE, "rows": rows}, failures)


def bundled_fp32() -> dict[str, Any]:
    """The bundled model's greedy tokens and logits in fp32: CUDA against the CPU."""
    device = cuda()
    cpu_model, tokenizer = load_bundled("cpu", "float32")
    want = outputs(cpu_model, tokenizer)
    del cpu_model
    model, _ = load_bundled(device, "float32")
    data = compare(outputs(model, tokenizer), want)
    data["tolerance"] = FP32_TOLERANCE
    failures = []
    if not data["tokens_equal"]:
        failures.append(f"greedy tokens differ at {data['first_difference']}")
    if not data["relative_logit_error"] <= FP32_TOLERANCE:
        failures.append(f"logits: relative error {data['relative_logit_error']:.2e} > {FP32_TOLERANCE}")
    detail = (
        f"{len(want[0])} prompts, {data['generated_tokens']} tokens: greedy tokens equal, logits relative "
        f"error {data['relative_logit_error']:.1e} <= {FP32_TOLERANCE}"
    )
    return finish(detail, data, failures)


def quantized() -> dict[str, Any]:
    """INT8, INT4 and INT4 group 128 (`quantization_transform`): fp16 on CUDA against fp32 on the CPU."""
    from glm.precision import describe_matmuls
    from glm.quantize import quantization_transform

    device = cuda()
    data: dict[str, Any] = {"tolerance": QUANTIZED_TOLERANCE}
    failures, parts = [], []
    for name, (bits, scheme, group_size) in SCHEMES.items():
        transform = quantization_transform(bits, scheme, group_size)
        cpu_model, tokenizer = load_bundled("cpu", "float32", [transform])
        want = outputs(cpu_model, tokenizer)
        del cpu_model
        model, _ = load_bundled(device, "float16", [transform])
        result = {**compare(outputs(model, tokenizer), want), "matmuls": describe_matmuls(model)}
        del model
        free_cuda()
        data[name] = result
        error = result["relative_logit_error"]
        if not error <= QUANTIZED_TOLERANCE:
            failures.append(f"{name}: logits relative error {error:.2e} > {QUANTIZED_TOLERANCE}")
        tokens = (
            "tokens equal" if result["tokens_equal"] else f"tokens differ at {result['first_difference']}"
        )
        parts.append(f"{name} {error:.1e}, {tokens}")
    detail = f"logits relative error (<= {QUANTIZED_TOLERANCE}): " + "; ".join(parts)
    return finish(detail, data, failures)


def _warm_cublas(device: torch.device) -> None:
    """Allocate cuBLAS / cuBLASLt workspaces now, so that memory measured from here on is the model's."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.ones(8, 64, device=device, dtype=dtype)
        torch.nn.functional.linear(x, x[:4], x[0, :4])
        torch.bmm(x[None], x.t()[None])
    torch.cuda.synchronize(device)


def offload_budget(bits: int | None) -> tuple[str | int, str]:
    """`--max-memory 50%`, or, where that is below the streaming minimum (the bundled model's INT4: its
    fp16 embedding alone is more than half of it), the budget halfway from the minimum to the whole model."""
    from glm.config import GLMConfig
    from glm.offload import OffloadError, format_bytes, plan_offload
    from glm.plan import build_meta_model, run_transforms
    from glm.run_config import DEFAULT_MODEL

    model = build_meta_model(
        GLMConfig.from_file(DEFAULT_MODEL / "model_config.json"), run_transforms(1, bits)
    )
    try:
        plan_offload(model, "50%", torch.float16)
        return "50%", "50%"
    except OffloadError as error:
        probe = plan_offload(model, "99%", torch.float16)
        budget = (probe.fixed_bytes + probe.buffer_bytes + probe.total_bytes) // 2
        return budget, f"{format_bytes(budget)} (50% is too little: {error})"


def _measured_run(device: torch.device, transforms: Sequence[Transform]) -> dict[str, Any]:
    """Load the bundled model in fp16 with `transforms` and generate greedily; its tokens and memory (MiB
    above what was allocated before: the load's peak, the run's peak, what stays held after the run)."""
    free_cuda()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer = load_bundled(device, "float16", transforms)
    torch.cuda.synchronize(device)
    run = {"load_peak_mib": (torch.cuda.max_memory_allocated(device) - base) / MIB}
    run["loaded_mib"] = (torch.cuda.memory_allocated(device) - base) / MIB  # buffers come at the first use
    torch.cuda.reset_peak_memory_stats(device)  # from here, the run's peak: what the planner plans
    run["tokens"] = greedy(model, tokenizer)
    gc.collect()
    torch.cuda.synchronize(device)
    run["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
    run["held_after_run_mib"] = (torch.cuda.memory_allocated(device) - base) / MIB
    streamer = getattr(model, "offload", None)
    run["streamed_units"] = len(streamer.plan.streamed_units) if streamer is not None else 0
    return run


def _offload_case(device: torch.device, bits: int | None) -> tuple[dict[str, Any], list[str]]:
    """One precision with and without offload, against `plan_memory` for the offloaded run."""
    from glm.config import GLMConfig
    from glm.offload import offload_from_args
    from glm.plan import plan_memory
    from glm.quantize import quantization_transform
    from glm.run_config import DEFAULT_MODEL
    from tools.ship_model import GREEDY, GREEDY_PROMPTS

    quantize = [] if bits is None else [quantization_transform(bits)]
    budget, budget_text = offload_budget(bits)
    flags = argparse.Namespace(max_memory=budget)  # as --max-memory reaches glm.api.load_from_args
    resident = _measured_run(device, quantize)
    got = _measured_run(device, [*quantize, offload_from_args(flags, device, torch.float16)])
    plan = plan_memory(
        GLMConfig.from_file(DEFAULT_MODEL / "model_config.json"),
        bits=bits,
        dtype=torch.float16,
        device_type="cuda",
        batch_size=len(GREEDY_PROMPTS),  # fill_blanks: one row per prompt
        max_length=GREEDY.out_seq_length,
        max_memory=budget,
    )
    planned_peak = (plan.total - plan.workspace) / MIB  # the workspaces are in the baseline (_warm_cublas)
    planned_weights = plan.device_weights / MIB  # resident weights and the streaming buffers
    difference = first_difference(got["tokens"], resident["tokens"], "no offload")
    result = {
        "max_memory": budget_text,
        "tokens_equal": difference is None,
        "first_difference": difference,
        "planned_streamed_units": len(plan.offload.streamed_units),
        "planned_device_weights_mib": planned_weights,
        "planned_peak_mib": planned_peak,
        **{f"offload_{k}": v for k, v in got.items() if k != "tokens"},
        **{f"resident_{k}": v for k, v in resident.items() if k != "tokens"},
    }
    failures = []
    if difference is not None:
        failures.append(f"tokens differ from the run without offload: {difference}")
    if not 0 < got["streamed_units"] == len(plan.offload.streamed_units):
        failures.append(f"{got['streamed_units']} units streamed, planned {len(plan.offload.streamed_units)}")
    if not got["held_after_run_mib"] <= planned_weights * 1.02 + 1:
        failures.append(
            f"{got['held_after_run_mib']:.2f} MiB held after the run > the planned weights on the device "
            f"({planned_weights:.2f} MiB)"
        )
    if not got["peak_mib"] <= planned_peak * (1 + PEAK_SLACK[0]) + PEAK_SLACK[1] / MIB:
        failures.append(f"peak {got['peak_mib']:.2f} MiB > planned {planned_peak:.2f} MiB + slack")
    return result, failures


def offload() -> dict[str, Any]:
    """`--max-memory 50%` (glm.offload's `offload_from_args`) in fp16 and INT4: the tokens of the run
    without offload, and memory against the planner (glm/plan.py's `plan_memory`)."""
    device = cuda()
    _warm_cublas(device)
    data: dict[str, Any] = {"peak_slack": PEAK_SLACK}
    failures, parts = [], []
    for name, bits in (("fp16", None), ("int4", 4)):
        result, problems = _offload_case(device, bits)
        data[name] = result
        failures += [f"{name}: {problem}" for problem in problems]
        parts.append(
            f"{name} at {result['max_memory'].split(' (')[0]}: peak {result['offload_peak_mib']:.1f} MiB "
            f"(planned {result['planned_peak_mib']:.1f}, without offload {result['resident_peak_mib']:.1f})"
        )
    return finish("tokens equal to no offload; " + "; ".join(parts), data, failures)


def compile_graphs() -> dict[str, Any]:
    """The engine's decode step eager, with torch.compile and with CUDA graphs (fp32): equal greedy tokens;
    the skipped CUDA-graph captures as torch's inductor counts them (the engine reports none)."""
    from torch._dynamo.utils import counters

    from glm.decoding import Engine, Request
    from glm.decoding.strategies import BaseStrategy

    device = cuda()
    model, tokenizer = load_bundled(device, "float32")
    prompts = contexts(tokenizer)
    new_tokens = 32
    ends = [tokenizer.eop_id, tokenizer.eos_id]
    max_length = max(len(c) for c, _ in prompts) + new_tokens
    modes = {"eager": {}, "compile": {"compile": True}, "cuda_graphs": {"cuda_graphs": True}}
    data: dict[str, Any] = {}
    tokens: dict[str, list[list[int]]] = {}
    for mode, flags in modes.items():
        torch._dynamo.reset()  # each mode compiles afresh (and its first run shows what that costs)
        counters.clear()
        engine = Engine(model, groups=len(prompts), width=1, max_length=max_length, **flags)
        timings = []
        for _ in range(2):  # the first run compiles / captures
            requests = [
                Request(c, BaseStrategy(1, top_k=1, end_tokens=ends), new_tokens, mask_position=p)
                for c, p in prompts
            ]
            start = time.perf_counter()
            engine.run(requests)
            torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - start)
            for request in requests:
                if request.error is not None:
                    raise request.error
            runs = [r.outputs[0].ids if r.outputs else [] for r in requests]
            tokens.setdefault(mode, runs)
            if runs != tokens[mode]:
                tokens[f"{mode} (second run)"] = runs
        data[mode] = {
            "first_run_s": timings[0],
            "second_run_s": timings[1],
            "tokens_per_s": sum(map(len, runs)) / timings[1],
            "inductor_cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
            "engine_cudagraph_skips": engine.cudagraph_skips,  # the captures the engine reported skipped
        }
        del engine
    failures = [
        f"{mode}: tokens differ from eager: {first_difference(got, tokens['eager'], 'eager')}"
        for mode, got in tokens.items()
        if got != tokens["eager"]
    ]
    skips = data["cuda_graphs"]["engine_cudagraph_skips"]
    detail = (
        "eager / compile / cuda_graphs: greedy tokens equal; second run "
        + " / ".join(f"{data[m]['tokens_per_s']:.0f}" for m in modes)
        + f" tok/s; CUDA-graph captures skipped: {skips}"
    )
    return finish(detail, data, failures)
